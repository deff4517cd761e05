"""Load the tokenizer and the model (full or LoRA) the way the training flags ask for."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .families import family_of


def load_dtype(training_args) -> torch.dtype:
    """bf16/fp16 flags decide the weights' dtype at load time; fp32 otherwise."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def lora_target_modules(model_args, config) -> list[str] | str:
    if model_args.lora_target_modules:
        names = [n.strip() for n in model_args.lora_target_modules.split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names
    return family_of(config).lora_targets(config)


def qlora_kwargs(compute_dtype: torch.dtype, device) -> dict:
    """from_pretrained arguments for 4-bit NF4 base weights on `device`, the 4-bit matmuls computing in
    `compute_dtype` (the training dtype: bf16 with --bf16, fp16 with --fp16 on GPUs without bf16, else fp32)."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": quantization, "device_map": {"": device}}


def load_model(model_args, training_args):
    """The causal LM from a hub id or folder; wrapped with a fresh LoRA adapter when --use_lora.

    --bf16 loads the base weights in bf16; the LoRA adapter stays fp32 (PEFT's autocast_adapter_dtype).
    --qlora loads them in 4-bit NF4 instead and prepares the model for k-bit training.
    """
    qlora = getattr(model_args, "qlora", False)
    compile_layers = getattr(training_args, "compile_layers", False)
    dtype = load_dtype(training_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        **(qlora_kwargs(dtype, training_args.device) if qlora else {}),
    )
    model.config.use_cache = False  # the KV cache is for generation, not training
    if qlora:
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings to fp32 for stable training; checkpointing is left to the Trainer's flag.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if training_args.activation_checkpointing or compile_layers:
        # Frozen embeddings under LoRA give inputs without grad; checkpointed blocks still need one, and
        # compiled layers then share one graph (else layer 0, whose input needs no grad, gets its own).
        model.enable_input_require_grads()
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                          lora_dropout=model_args.lora_dropout,
                          target_modules=lora_target_modules(model_args, model.config))
        model = get_peft_model(model, lora)  # adapters are kept in fp32 even over bf16 weights
        if training_args.process_index == 0:
            model.print_trainable_parameters()
    if compile_layers:
        count = compile_decoder_layers(model)  # after PEFT: the LoRA layers are traced into each layer's graph
        if training_args.process_index == 0:
            print(f"compile_layers: {count} decoder layers will be compiled on their first training steps")
    return model


def compile_decoder_layers(model, dynamic: bool | None = True) -> int:
    """torch.compile every decoder layer in place ("regional compilation"); returns how many.

    Fuses each layer's elementwise work (fp32 RMSNorm casts, rotary, SwiGLU, muP residual scalings)
    while the embedding, the chunked loss (data-dependent shapes) and everything else stay eager.
    ``nn.Module.compile`` keeps the module and its parameter names (no ``_orig_mod.`` prefix), so saved
    models and adapters load back unchanged. The layers share one code object, so one graph serves them
    all. ``dynamic=True`` traces batch and length as symbols from the start: one compile covers every
    length (unpacked batches vary; packed ones are multiples of 64) instead of a static compile followed
    by a dynamic recompile. Works through a PEFT wrapper; compilation itself happens on the first call.
    """
    decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = family_of(decoder.config).decoder_layers
    layers = decoder
    for name in path.split("."):
        layers = getattr(layers, name, None)
    if not layers:
        raise ValueError(f"{type(decoder).__name__} has no decoder layers ({path}) to compile")
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)
