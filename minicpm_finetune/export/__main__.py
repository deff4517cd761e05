"""python -m minicpm_finetune.export: merge, llama or gguf (commands.py)."""

import sys

from .commands import main

sys.exit(main())
