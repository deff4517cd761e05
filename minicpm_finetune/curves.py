"""``python -m minicpm_finetune.curves``, the documented command: the plots live in
``minicpm_finetune.evaluation.curves``."""

import sys

from .evaluation.curves import *  # noqa: F401,F403
from .evaluation.curves import main

if __name__ == "__main__":
    sys.exit(main())
