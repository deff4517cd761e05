"""python -m minicpm_finetune.export: merge or llama (commands.py)."""

import sys

from .commands import main

sys.exit(main())
