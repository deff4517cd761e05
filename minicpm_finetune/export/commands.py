"""Export a MiniCPM model: fold it into Llama layout, merge a LoRA adapter into its base, or write GGUF.

    python -m minicpm_finetune.export llama --model DIR --output_dir OUT [--dtype bfloat16] [--no_check]
    python -m minicpm_finetune.export merge --adapter DIR --output_dir OUT [--dtype bfloat16] [--no_check]
    python -m minicpm_finetune.export gguf --model DIR --output_dir OUT [--outtype f32|f16|bf16|q8_0] [--no_check]

``llama`` folds MiniCPM's muP scalings into the weights of a plain LlamaForCausalLM (what OpenBMB
publishes as "llama-format" checkpoints): embeddings x scale_emb, o_proj and down_proj x
scale_depth/sqrt(num_layers), lm_head = (lm_head, or the embeddings when tied) / (hidden/dim_model_base),
untied. The folding is done in fp32 and cast back to the model's dtype; in fp32 the Llama model gives
the same logits as the MiniCPM one.

``merge`` loads the base named by the adapter's ``base_model_name_or_path`` (a folder, or a hub id
through the hub's local cache), applies the adapter and merges it. The merge math runs in fp32 (the
base is upcast, merged, then cast back), and the result is saved in the dtype of the base weights
unless ``--dtype`` says otherwise; a bf16 base therefore gives a bf16 merged model, with one rounding
of the merged weight rather than one per step. The tokenizer (and its chat template) comes from the adapter
folder when it has one, else from the base.

Every output keeps the tokenizer's own files (``tokenizer.model`` and its settings, see portable.py);
a merged MiniCPM also carries its model code and an ``auto_map``, so it loads without this package
(``trust_remote_code=True``).

``gguf`` writes ``model-OUTTYPE.gguf`` (llama.cpp's ``llama`` architecture, MiniCPM folded as above; a
LoRA adapter is merged on the fly) and an Ollama ``Modelfile`` beside it (gguf.py).

Every command runs the parity gate (parity.py) on its result before it is moved into place: loaded back,
compared with its source on a handful of prompts, one ``parity ...`` line printed; beyond the tolerance of its
dtype the command fails and writes nothing (``--no_check`` skips it).

All write to a temporary folder next to OUT and rename it at the end, so OUT is either complete
or absent. Bad arguments print one ``error: ...`` line and exit with status 2.
"""

import json
import os
import shutil
import sys

import torch

from ..cli import FinetuneError, OneLineParser, atomic_path, check_output_path, command, load_error, looks_local
from ..models.families import FAMILIES, family_of
from .gguf import OUTTYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_LEARNING_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT"}


class ExportError(FinetuneError):
    """A problem with the user's inputs (a model or adapter folder, the output folder)."""


def fold_into_llama(model):
    """Return a LlamaForCausalLM (fp32 math, cast back to the model's dtype) with the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    dtype = model.dtype
    state = {name: tensor.detach().to(torch.float32) for name, tensor in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    head = embed if config.tie_word_embeddings else state["lm_head.weight"]
    folded = dict(state)
    folded["lm_head.weight"] = head / config.logits_scale
    folded["model.embed_tokens.weight"] = embed * config.scale_emb
    for layer in range(config.num_hidden_layers):
        for name in (f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"):
            folded[name] = state[name] * config.residual_scale

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout,
        mlp_bias=False,
        dtype=dtype,
    )
    # Built on the meta device: the real tensors are assigned just below, no random init needed.
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    llama.load_state_dict({name: tensor.to(dtype) for name, tensor in folded.items()}, assign=True)
    # Non-persistent rotary buffers were created on meta; rebuild them for real.
    llama.model.rotary_emb = type(llama.model.rotary_emb)(llama_config)
    llama.generation_config = model.generation_config
    return llama.eval()


def _save_tokenizer(source: str, output_dir: str) -> None:
    """The tokenizer of ``source`` (a folder, or a hub id through the hub's cache) as an output carries it
    (portable.py), its chat template included: an output of finetune.py already holds the template it was
    trained with, and a base's own template belongs to it."""
    from ..data.tokenizer import load_tokenizer, tokenizer_folder
    from .portable import save_tokenizer

    if tokenizer_folder(source) is not None:
        save_tokenizer(load_tokenizer(source), output_dir)


def _check_output_dir(output_dir: str) -> None:
    check_output_path(output_dir)  # a file, or a place that cannot be written: said before the model is loaded
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ExportError(f"output_dir already exists and is not empty: {output_dir}")


def _check_model_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise ExportError(f"model folder not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ExportError(f"not a model folder (no config.json): {model_dir}")


def _load_full_model(model_dir: str):
    """The model of a folder in its stored dtype, and that dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return model, model.dtype


def _reference(model, source: str, prompt_folders: list[str], check: bool):
    """The parity gate's reference run of the source (parity.py); None when the check is off. The model is
    upcast to fp32 in place."""
    from ..data.tokenizer import load_chat_tokenizer
    from .parity import check_prompts, reference

    model.float()
    if not check:
        return None
    prompts, origin = check_prompts(*prompt_folders)
    return reference(model, load_chat_tokenizer(source), prompts, origin)


def _check_folder(ref, folder: str, output_dir: str) -> None:
    from .parity import check_model_folder

    if ref is not None:
        print(check_model_folder(ref, folder, output_dir), flush=True)


def _keep_check_prompts(sources: list[str], output_dir: str) -> None:
    """An output keeps the prompts stored with its run, for the gate of its own exports."""
    from .parity import PROMPTS_FILE

    for source in sources:
        if os.path.isfile(os.path.join(source, PROMPTS_FILE)):
            shutil.copyfile(os.path.join(source, PROMPTS_FILE), os.path.join(output_dir, PROMPTS_FILE))
            return


def export_llama(model_dir: str, output_dir: str, dtype: str | None = None, check: bool = True) -> None:
    """Write a LlamaForCausalLM folder equivalent to the MiniCPM model in model_dir; the parity gate compares
    it with the source before it is moved into place."""
    from transformers import AutoConfig

    _check_model_dir(model_dir)
    _check_output_dir(output_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if not family_of(config).llama_export:
        foldable = " or ".join(f"'{t}'" for t, family in FAMILIES.items() if family.llama_export)
        raise ExportError(f"expected a model_type {foldable} model, got '{config.model_type}': {model_dir}")
    model, stored = _load_full_model(model_dir)
    ref = _reference(model, model_dir, [model_dir], check)
    llama = fold_into_llama(model).to(DTYPES[dtype] if dtype else stored)  # folded in fp32, rounded once
    del model

    with atomic_path(output_dir, folder=True) as tmp_dir:  # Llama layout: transformers' own class, no code to ship
        llama.save_pretrained(tmp_dir)
        _save_tokenizer(model_dir, tmp_dir)
        _keep_check_prompts([model_dir], tmp_dir)
        del llama
        _check_folder(ref, tmp_dir, output_dir)


def _read_adapter_config(adapter_dir: str) -> dict:
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isdir(adapter_dir):
        raise ExportError(f"adapter folder not found: {adapter_dir}")
    if not os.path.isfile(config_path):
        raise ExportError(f"not a PEFT adapter folder (no adapter_config.json): {adapter_dir}")
    try:
        with open(config_path, encoding="utf-8") as f:
            adapter_config = json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {config_path}: {err}") from None
    if adapter_config.get("peft_type") in PROMPT_LEARNING_TYPES:
        raise ExportError(f"a {adapter_config['peft_type']} adapter has no weights to merge: {adapter_dir}")
    if not adapter_config.get("base_model_name_or_path"):
        raise ExportError(f"{config_path} does not name its base model (base_model_name_or_path)")
    return adapter_config


def _resolve_base(adapter_dir: str, base: str) -> str:
    """A relative base path is tried as given, then relative to the adapter folder."""
    if os.path.isdir(base) or os.path.isabs(base):
        return base
    beside_adapter = os.path.join(adapter_dir, base)
    return beside_adapter if os.path.isdir(beside_adapter) else base


def _copy_remote_code_or_drop_auto_map(model, base_dir: str, output_dir: str) -> None:
    """Keep `auto_map` only when its code files can ship with the merged model (a family implemented here
    ships ours instead: portable.ship_model_code)."""
    auto_map = getattr(model.config, "auto_map", None)
    if not auto_map or family_of(model.config).native:
        return
    code_files = {ref.split("--")[-1].split(".")[0] + ".py" for ref in auto_map.values() if isinstance(ref, str)}
    if os.path.isdir(base_dir) and all(os.path.isfile(os.path.join(base_dir, name)) for name in code_files):
        for name in code_files:
            shutil.copy2(os.path.join(base_dir, name), output_dir)
    else:
        del model.config.auto_map


def _adapter_base(adapter_dir: str) -> tuple[str, str]:
    """The base model an adapter names (a folder, checked, or a hub id) and where it is named."""
    adapter_config = _read_adapter_config(adapter_dir)
    named_in = f"named in {adapter_dir}/adapter_config.json"
    base = _resolve_base(adapter_dir, adapter_config["base_model_name_or_path"])
    if looks_local(base):
        if not os.path.isdir(base):
            raise ExportError(f"base model folder not found: {base} ({named_in})")
        _check_model_dir(base)
    return base, named_in


def _merged(adapter_dir: str, base: str, named_in: str, check: bool):
    """(the merged model in fp32, the base's stored dtype, the gate's reference: base + adapter unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import has_tokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except OSError as err:  # e.g. a hub id that is neither in the local cache nor reachable
        raise load_error(f"the base model {base} ({named_in})", err) from None
    stored = model.dtype
    model = PeftModel.from_pretrained(model.float(), adapter_dir).eval()
    tokenizer_source = adapter_dir if has_tokenizer(adapter_dir) else base
    ref = _reference(model, tokenizer_source, [adapter_dir, base] if os.path.isdir(base) else [adapter_dir], check)
    return model.merge_and_unload(), stored, ref


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str | None = None, check: bool = True) -> None:
    """Merge the LoRA adapter in adapter_dir into its base model and save the standalone result.

    The base is the folder or hub id named in adapter_config.json; a hub id is loaded through the hub's
    local cache (offline with HF_HUB_OFFLINE=1), else downloaded. The parity gate compares the saved result
    with base + adapter before it is moved into place."""
    from ..data.tokenizer import has_tokenizer
    from .portable import ship_model_code

    base, named_in = _adapter_base(adapter_dir)
    _check_output_dir(output_dir)
    model, stored, ref = _merged(adapter_dir, base, named_in, check)
    target_dtype = DTYPES[dtype] if dtype else stored
    model = model.to(target_dtype)
    model.config.dtype = target_dtype

    with atomic_path(output_dir, folder=True) as tmp_dir:
        _copy_remote_code_or_drop_auto_map(model, base, tmp_dir)
        model.save_pretrained(tmp_dir)
        ship_model_code(tmp_dir)
        # The adapter's tokenizer is the one it was trained with (finetune.py saves it); else the base's.
        _save_tokenizer(adapter_dir if has_tokenizer(adapter_dir) else base, tmp_dir)
        _keep_check_prompts([adapter_dir], tmp_dir)
        del model
        _check_folder(ref, tmp_dir, output_dir)


def export_gguf(model: str, output_dir: str, outtype: str = "f16", check: bool = True) -> None:
    """Write ``model-OUTTYPE.gguf`` and an Ollama ``Modelfile`` for a MiniCPM or Llama-layout model folder, or a
    LoRA adapter (merged on the fly, in fp32); the parity gate reads the file back and runs it through
    llama.cpp when llama-cpp-python is installed, before the folder is moved into place (gguf.py, parity.py)."""
    from ..data.tokenizer import has_tokenizer, load_chat_tokenizer, tokenizer_folder
    from .gguf import check_written_tensors, gguf_file_name, modelfile, write_gguf
    from .gguf_vocab import vocabulary
    from ..data.templates import stop_token_ids
    from .parity import check_gguf

    adapter = os.path.isfile(os.path.join(model, "adapter_config.json"))
    if adapter:
        base, named_in = _adapter_base(model)
        source = model if has_tokenizer(model) else base  # where the tokenizer trained with is
    else:
        _check_model_dir(model)
        source = model
    tokenizer_dir = tokenizer_folder(source)
    if tokenizer_dir is None:
        raise ExportError(f"no tokenizer in {source}: GGUF export writes the vocabulary trained with")
    tokenizer = load_chat_tokenizer(source)
    vocabulary(tokenizer_dir, tokenizer)  # one that llama.cpp cannot run alike is refused before the model loads
    _check_output_dir(output_dir)
    if adapter:
        merged, _, ref = _merged(model, base, named_in, check)
    else:
        merged, _ = _load_full_model(model)
        ref = _reference(merged, model, [model], check)
    if family_of(merged.config).llama_export:
        llama = fold_into_llama(merged)
    elif merged.config.model_type == "llama":
        llama = merged
    else:
        raise ExportError(f"GGUF export takes a MiniCPM-1/2/4 or Llama-layout model, got "
                          f"'{merged.config.model_type}': {model}")
    name = gguf_file_name(outtype)
    with atomic_path(output_dir, folder=True) as tmp_dir:
        path = os.path.join(tmp_dir, name)
        write_gguf(llama, tokenizer, tokenizer_dir, path, outtype, os.path.basename(os.path.abspath(output_dir)))
        with open(os.path.join(tmp_dir, "Modelfile"), "w", encoding="utf-8") as f:
            f.write(modelfile(tokenizer, name))
        if check:
            print(check_written_tensors(path, llama, outtype, output_dir), flush=True)
            print(check_gguf(ref, path, outtype, stop_token_ids(tokenizer), output_dir), flush=True)


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m minicpm_finetune.export", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    llama = commands.add_parser("llama", help="fold a MiniCPM model into Llama layout")
    llama.add_argument("--model", required=True, help="MiniCPM model folder")
    llama.add_argument("--output_dir", required=True)
    llama.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtype the model is stored in")
    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder")
    merge.add_argument("--output_dir", required=True)
    merge.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtype of the base weights")
    gguf = commands.add_parser("gguf", help="a GGUF file for llama.cpp, Ollama and LM Studio, and a Modelfile")
    gguf.add_argument("--model", required=True, help="MiniCPM or Llama-layout model folder, or a LoRA adapter")
    gguf.add_argument("--output_dir", required=True)
    gguf.add_argument("--outtype", choices=OUTTYPES, default="f16", help="weight storage (default f16)")
    for sub in (llama, merge, gguf):
        sub.add_argument("--no_check", action="store_true", help="skip the parity check of the result")
    args = parser.parse_args(argv)

    if args.command == "llama":
        export_llama(args.model, args.output_dir, args.dtype, check=not args.no_check)
    elif args.command == "merge":
        merge_adapter(args.adapter, args.output_dir, args.dtype, check=not args.no_check)
    else:
        export_gguf(args.model, args.output_dir, args.outtype, check=not args.no_check)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
