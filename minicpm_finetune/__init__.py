"""minicpm-finetune: fine-tune MiniCPM models with LoRA or full-parameter DeepSpeed training.

Importing the package registers the native MiniCPM implementation (``model_type: minicpm``)
with transformers' Auto classes, so official checkpoints load without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_minicpm import MiniCPMConfig
from .modeling_minicpm import MiniCPMForCausalLM, MiniCPMModel

# Registered classes whose module is outside `transformers.` count as "explicit local code" in
# transformers 5: the Auto classes then use them even when config.json has an `auto_map` to remote
# code, with trust_remote_code unset, False or True.
AutoConfig.register(MiniCPMConfig.model_type, MiniCPMConfig, exist_ok=True)
AutoModel.register(MiniCPMConfig, MiniCPMModel, exist_ok=True)
AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM, exist_ok=True)
