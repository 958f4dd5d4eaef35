"""`python -m batch_caption.prepare`: runs the job (see the package docstring)."""

import sys

from batch_caption import quiet

quiet.setup()  # before the package below imports Beam, and anything TensorFlow

from batch_caption.prepare import main  # noqa: E402

sys.exit(main())
