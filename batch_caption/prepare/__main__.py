"""`python -m batch_caption.prepare`: runs the job (see the package docstring)."""

import sys

from batch_caption.prepare import main

sys.exit(main())
