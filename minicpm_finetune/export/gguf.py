"""A GGUF file for llama.cpp, Ollama and LM Studio, written with the ``gguf`` library (the one llama.cpp's own
converter writes with), and an Ollama ``Modelfile`` beside it.

Architecture. The file is llama.cpp's ``llama`` architecture: MiniCPM's muP scalings are folded into the
weights first (``fold_into_llama``, the same logits in fp32), so every llama.cpp build and every client on it
runs the file as a plain Llama; nothing depends on the ``minicpm`` architecture's scaling keys.

Weights. The Llama model's tensors under llama.cpp's names (``gguf.get_tensor_name_map``); q_proj and k_proj
rows are reordered per head from transformers' rotary layout (the two halves of each head) to the one llama.cpp
rotates for this architecture (adjacent pairs). 2-D weights are stored in the outtype (``q8_0`` needs rows of
whole 32-value blocks, else that tensor is f16); 1-D ones (the norms) stay f32.

Vocabulary. SentencePiece (``tokenizer.model``) or BPE (``tokenizer.json``): tokens, types, scores or merges
and the pre-tokenizer's name, as llama.cpp needs them to give training's ids (gguf_vocab.py). Special ids:
BOS, EOS, UNK, pad, and the end-of-turn token of the chat template we trained with (templates.py), where
generation stops.
"""

from __future__ import annotations

import numpy as np

from ..cli import FinetuneError
from ..data.templates import TEMPLATES, end_of_turn_token
from .gguf_vocab import vocabulary

ARCH = "llama"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MODELFILE = "Modelfile"
Q8_BLOCK = 32  # values per q8_0 block


class GGUFError(FinetuneError):
    """A model or tokenizer the GGUF writer cannot represent faithfully."""


def gguf_file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def _qtypes(outtype: str):
    import gguf

    q = gguf.GGMLQuantizationType
    return {"f32": (q.F32, gguf.LlamaFileType.ALL_F32), "f16": (q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}[outtype]


def rope_rows_to_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """q_proj / k_proj rows of each head from [first halves, second halves] to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(llama):
    """(llama.cpp name, float32 array) for every weight of a LlamaForCausalLM."""
    import gguf

    config = llama.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in llama.state_dict().items():
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            array = rope_rows_to_gguf(array, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = rope_rows_to_gguf(array, config.num_key_value_heads)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise GGUFError(f"no llama.cpp name for the tensor {name}")
        yield new_name, array


def _encoded(array: np.ndarray, outtype: str):
    """(data, GGML type) of one tensor in the outtype (see the module docstring)."""
    import gguf

    q = gguf.GGMLQuantizationType
    qtype = _qtypes(outtype)[0]
    if array.ndim <= 1:
        qtype = q.F32
    elif qtype == q.Q8_0 and array.shape[-1] % Q8_BLOCK:
        qtype = q.F16
    return gguf.quants.quantize(array, qtype), qtype


def _rope(writer, config) -> None:
    import gguf

    rope = dict(config.rope_parameters or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise GGUFError(f"RoPE scaling '{kind}' is not written to GGUF here (default and linear are)")


def _special_ids(writer, tokenizer) -> None:
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_eot_token_id, tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)))):
        if token_id is not None:
            add(int(token_id))
    starts_with_bos = tokenizer.bos_token_id is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(starts_with_bos)
    writer.add_add_eos_token(False)


def write_gguf(llama, tokenizer, tokenizer_dir: str, path: str, outtype: str, name: str) -> None:
    """Write the LlamaForCausalLM ``llama`` (MiniCPM folded) and ``tokenizer`` (its files in tokenizer_dir,
    its chat template the one trained with) to the GGUF file ``path``."""
    import gguf

    config = llama.config
    vocab = vocabulary(tokenizer_dir, tokenizer, config.vocab_size)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(name)
    writer.add_file_type(_qtypes(outtype)[1])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _rope(writer, config)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(bool(vocab.add_space_prefix))
    _special_ids(writer, tokenizer)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)

    for tensor_name, array in gguf_tensors(llama):
        data, qtype = _encoded(array, outtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Ollama's Go templates for the built-in chat templates (templates.py); BOS comes from the file's add_bos_token.
OLLAMA_TEMPLATES = {
    "minicpm": ('{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}'
                '{{ else if eq .Role "user" }}<用户>{{ .Content }}<AI>'
                '{{ else if eq .Role "assistant" }}{{ .Content }}{{ eos }}{{ end }}{{ end }}'),
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n'),
}


def modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file: the chat template as a Go template (built-in templates) and the
    stop tokens (the end-of-turn token, and EOS)."""
    lines = [f"# ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    builtin = next((key for key, template in TEMPLATES.items() if template.text == tokenizer.chat_template), None)
    if builtin in OLLAMA_TEMPLATES:  # minicpm5 (think blocks, tools) is left to the template in the GGUF file
        template = OLLAMA_TEMPLATES[builtin].replace("{{ eos }}", tokenizer.eos_token)
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: not translated (a custom or minicpm5 chat template); Ollama reads the one in the "
                     "GGUF file")
    stops = dict.fromkeys([end_of_turn_token(tokenizer), tokenizer.eos_token])
    lines += [f'PARAMETER stop "{token}"' for token in stops if token]
    return "\n".join(lines) + "\n"


# Largest |stored - source| of a weight read back, relative to that tensor's largest |value|: one rounding.
STORAGE_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 8e-3}


def check_written_tensors(path: str, llama, outtype: str, target: str) -> str:
    """Read the file back with ``gguf.GGUFReader``: every weight present, none extra, each within one rounding of
    the outtype. Needs nothing but the gguf library, so it runs where llama-cpp-python is not installed."""
    import gguf

    from .parity import ParityError

    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    worst, limit = 0.0, STORAGE_TOLERANCE[outtype]
    for name, array in gguf_tensors(llama):
        tensor = stored.pop(name, None)
        if tensor is None:
            raise ParityError(f"{target}: the GGUF file lacks the tensor {name}; nothing was written")
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(array.shape)
        error = float(np.abs(values - array).max()) / max(float(np.abs(array).max()), 1e-30)
        if not error <= limit:
            raise ParityError(f"{target}: the GGUF tensor {name} differs from the model's by {error:.3g} of its "
                              f"range (> {limit:g} for {outtype}); nothing was written (--no_check skips the check)")
        worst = max(worst, error)
    if stored:
        raise ParityError(f"{target}: the GGUF file has tensors the model lacks: {sorted(stored)}")
    return f"read back: every tensor present, largest weight error {worst:.2g} of its range (limit {limit:g})"
