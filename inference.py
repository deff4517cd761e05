"""Chat with a (fine-tuned) MiniCPM, answer one prompt, or predict over a data file and score it.

    python inference.py --model_name_or_path MODEL --prompt "你好"

The same as the `minicpm-inference` command of the installed package; the code is minicpm_finetune/inference.py.
"""

import sys

from minicpm_finetune.inference import main

if __name__ == "__main__":
    sys.exit(main())
