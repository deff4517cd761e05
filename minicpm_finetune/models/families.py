"""The model families this toolkit knows, one table keyed by the config's ``model_type``.

Everything that differs between families is said here, once; the rest of the package asks
``family_of(config)`` instead of comparing model types:

- ``chat_template``: the built-in template (templates.TEMPLATES) used when the tokenizer ships none, or
  ``preferred_template`` when the tokenizer holds that template's markers as tokens (MiniCPM5's vocabulary
  under the Llama architecture); the template in use then says which token ends a turn
  (templates.end_of_turn_token).
- ``lora_targets``: the default ``--lora_target_modules`` for a config of the family.
- ``chunked_loss``: whether the model computes its loss in chunks without full logits (only the native
  implementation here does; the others pay for full-vocabulary logits, and a run says so in a note).
- ``native``: the implementation in this package (Auto class -> ``module.Class``), registered with
  transformers' Auto classes when the package is imported and shipped, with ``code_files`` and an
  ``auto_map``, in every saved full model (portable.py), so the folder loads without this package.
- ``llama_export``: whether ``export llama`` folds it into a LlamaForCausalLM (the muP scalings).
- ``liger_kernel``: whether Liger Kernel patches it (--use_liger_kernel is refused when it does not).
- ``decoder_layers``: where the decoder layers are, from the causal LM (compile_decoder_layers).

Adding a family is one entry in FAMILIES (plus, for a native one, its configuration and modeling files)
and its tiny config in TINY_CONFIGS of tests/conftest.py. A model type the table does not know gets UNKNOWN_FAMILY,
Llama-like defaults that work for most causal LMs, and the run prints one note saying so (``note``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def query_value_projections(config) -> list[str]:
    """The query and value projections, as in the original LoRA recipe (MiniCPM and Llama layouts)."""
    return ["q_proj", "v_proj"]


def latent_attention_up_projections(config) -> list[str]:
    """MiniCPM3 (multi-head latent attention): the up-projections that produce the per-head queries
    (``q_b_proj``, or ``q_proj`` when the config has no query low-rank) and the per-head keys and values
    (``kv_b_proj``); the down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) are already low-rank
    bottlenecks and also carry the shared RoPE key, so they are left alone."""
    query = "q_b_proj" if getattr(config, "q_lora_rank", None) is not None else "q_proj"
    return [query, "kv_b_proj"]


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    name: str  # the models, as people call them
    chat_template: str  # a templates.TEMPLATES name
    preferred_template: str | None = None  # used instead when the tokenizer holds its markers as tokens
    lora_targets: Callable[[object], list[str]] = query_value_projections
    chunked_loss: bool = False
    native: dict[str, str] = field(default_factory=dict)  # Auto class name -> "module.Class" in this package
    code_files: tuple[str, ...] = ()  # the files of this folder (models/) a saved model of a native family needs
    llama_export: bool = False
    liger_kernel: bool = True
    decoder_layers: str = "model.layers"


FAMILIES = {family.model_type: family for family in (
    ModelFamily(
        "minicpm", "MiniCPM-1/2/4/4.1", chat_template="minicpm", chunked_loss=True,
        native={"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                "AutoModel": "modeling_minicpm.MiniCPMModel",
                "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        # modeling_minicpm.py imports the other two relatively; transformers' dynamic loader follows that
        code_files=("configuration_minicpm.py", "modeling_minicpm.py", "loss.py"),
        llama_export=True, liger_kernel=False),
    # transformers' own class (official folders' auto_map points at remote code that is not needed).
    ModelFamily("minicpm3", "MiniCPM3", chat_template="chatml", lora_targets=latent_attention_up_projections,
                liger_kernel=False),
    # Llama-format MiniCPM-2B (what `export llama` writes: its tokenizer and template) and MiniCPM5 (Llama
    # architecture, its own ~130k vocabulary with <|im_start|>, <|im_end|>, <think>, </think>: its template).
    ModelFamily("llama", "Llama-format MiniCPM, MiniCPM5", chat_template="minicpm", preferred_template="minicpm5"),
)}

# Any other model type: Llama-like defaults. The tokenizer's own template comes first, as for every family; without
# one, minicpm, whose markers are plain text and whose replies end with eos, works with any tokenizer (ChatML needs
# <|im_start|> and <|im_end|> as special tokens, which most vocabularies lack).
UNKNOWN_FAMILY = ModelFamily("", "an unknown family", chat_template="minicpm")


def family_of(config_or_model_type) -> ModelFamily:
    """The family of a config, a model (its config) or a model type; UNKNOWN_FAMILY when the table lacks it."""
    model_type = config_or_model_type
    if not isinstance(model_type, str):
        config = getattr(config_or_model_type, "config", config_or_model_type)
        model_type = getattr(config, "model_type", None)
    return FAMILIES.get(model_type or "", UNKNOWN_FAMILY)


def note(config) -> str | None:
    """One line for the start of a run when the family lacks something or is not in the table; else None
    (also when the config could not be read)."""
    if config is None:
        return None
    family = family_of(config)
    if family is UNKNOWN_FAMILY:
        return (f"note: model_type '{config.model_type}' is not in the model-family table (families.py); "
                f"using defaults: chat template {family.chat_template} when the tokenizer has none, "
                f"LoRA targets {','.join(family.lora_targets(config))}, loss from full logits (no chunked loss)")
    if not family.chunked_loss:
        return (f"note: {family.name} ({family.model_type}) has no chunked loss here: the loss is computed from "
                "full-vocabulary logits")
    return None


def sparse_attention_refusal(config, max_length: int) -> str | None:
    """MiniCPM4/4.1's ``sparse_config`` (InfLLM v2) switches to sparse attention from ``dense_len`` tokens on
    (-1: always). The native model computes dense attention, which is what the model does below ``dense_len``:
    a run that stays below it trains exactly; one that reaches it is refused (one line), None otherwise."""
    sparse = getattr(config, "sparse_config", None)
    if not sparse:
        return None
    dense_len = sparse.get("dense_len", 8192) if isinstance(sparse, dict) else getattr(sparse, "dense_len", 8192)
    if dense_len is not None and 0 <= max_length < dense_len:
        return None
    where = "always (dense_len -1)" if dense_len is not None and dense_len < 0 else f"from {dense_len} tokens on"
    return (f"the model's sparse_config asks for InfLLM v2 sparse attention {where}, which this toolkit does not "
            f"train (its attention is dense); set --model_max_length below {max(dense_len or 0, 1)}, or remove "
            "sparse_config from config.json to train dense attention")


def register_native_classes() -> None:
    """Register every native family's classes with transformers' Auto classes.

    Registered classes whose module is outside ``transformers.`` count as "explicit local code" in
    transformers 5: the Auto classes then use them even when config.json has an ``auto_map`` to remote
    code, with trust_remote_code unset, False or True.
    """
    import importlib

    import transformers

    for family in FAMILIES.values():
        if not family.native:
            continue
        classes = {}
        for auto_name, reference in family.native.items():
            module, name = reference.rsplit(".", 1)
            classes[auto_name] = getattr(importlib.import_module(f".{module}", __package__), name)
        config_class = classes.pop("AutoConfig")
        transformers.AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for auto_name, model_class in classes.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
