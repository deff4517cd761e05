"""Chat with a (fine-tuned) MiniCPM, answer one prompt, or predict over a data file and score it.

    python inference.py --model_name_or_path MODEL --prompt "你好"

The code is minicpm_finetune/evaluation/inference.py, which the installed package also runs as `minicpm-inference`.
"""

import sys

from minicpm_finetune.evaluation import inference

if __name__ == "__main__":
    sys.exit(inference.main())
else:  # `import inference` gives the package module itself
    sys.modules[__name__] = inference
