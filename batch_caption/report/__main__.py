"""`python -m batch_caption.report RUN_DIR`: see report/page.py."""

import sys

from batch_caption.report.page import main

sys.exit(main())
