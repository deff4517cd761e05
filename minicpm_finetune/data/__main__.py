"""python -m minicpm_finetune.data: the data preview (preview.py)."""

import sys

from .preview import main

sys.exit(main())
