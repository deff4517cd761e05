"""Tokenizers whose ids are their SentencePiece model's: finding a tokenizer's files, loading it, and the
``tokenizer.json`` every output carries.

Why. MiniCPM-1/2 ship only a SentencePiece model (``tokenizer.model``, ``legacy: true``). Transformers 5
builds a ``LlamaTokenizer`` from it whose pre-tokenizer starts every piece of text with "▁" (its
``add_prefix_space`` defaults to true, and ``legacy`` makes it "always"). The model's user-defined pieces
(Chinese punctuation, "\\n", HTML tags: 1,086 in MiniCPM-2B) become added tokens that split the text, so
``好的，是的。`` turns into 好的 ， ▁ 是的 。 and ``<s><用户>`` into <s> ▁< 用户 >. SentencePiece adds a "▁"
only at the very start of a text, and only when its ``add_dummy_prefix`` is set (MiniCPM-2B: not set).

What. ``load_tokenizer`` loads with ``AutoTokenizer``; where the tokenizer's folder has a ``tokenizer.model``,
it compares the ids on ``PROBES`` with ``sentencepiece`` itself. A tokenizer that agrees is kept as loaded
(MiniCPM3/4 ship their own ``tokenizer.json``). One that does not gets the pre-tokenizer and decoder the
model's normalizer spec asks for; if it still disagrees, one error line names the text and both token lists.

Outputs. Transformers 5 rebuilds a ``LlamaTokenizer``'s pipeline from its flags and ignores the one in
``tokenizer.json``; transformers 4.40 converts from the SentencePiece model when ``add_prefix_space`` is set,
losing multi-character user-defined pieces such as ``<td>``. So an output of an aligned tokenizer carries
``tokenizer.json`` (written so that the ``tokenizers`` of transformers 4.40 reads it too) and names
``PreTrainedTokenizerFast`` as its class: both versions then load that file as it is (``portable.py``).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os

from ..cli import FinetuneError

# Files that make up a tokenizer. The first three mark a folder as holding one.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "tokenization_*.py",  # a tokenizer's own code, named by its config's auto_map
)
SENTENCEPIECE_FILE = "tokenizer.model"
# The class an output of an aligned tokenizer names: both transformers 4.40 and 5 load its tokenizer.json as is.
PORTABLE_CLASS = "PreTrainedTokenizerFast"

# Texts on which a tokenizer must give its SentencePiece model's ids: user-defined pieces (Chinese
# punctuation, "\n", "\t", HTML tags) at the start, middle and end, MiniCPM-2B's role markers, digits, runs of
# spaces, mixed scripts, full-width forms, emoji and characters only byte fallback can encode.
PROBES = (
    "好的，是的。",
    "这款连衣裙，优雅大方。你好！<用户>问题？",
    "<用户>你好<AI>你好，有什么可以帮你的吗？",
    "类型#裙*版型#显瘦*风格#文艺；材质：棉、麻",
    "价格299元，折扣8.5折，2024年12月4日发货。",
    " leading space, two  spaces, trailing space ",
    "Hello, world! How are you? I'm fine, thanks.",
    "第一行\n第二行\t制表符\n\n  缩进的行",
    "<td>表格</td><strong>加粗</strong><br/>换行",
    "中英混排mixed文本 text，标点.punctuation；",
    "emoji 😀👍🏽，全角ＡＢＣ１２３，①½，𝕌𝕟𝕚𝕔𝕠𝕕𝕖",
    "「引号」『书名』（括号）【方括号】——破折号……省略号",
    "，开头", "结尾！", "。", "\n", " ", "",
)


class TokenizerError(FinetuneError):
    """A tokenizer whose ids cannot be made to equal its SentencePiece model's."""


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_FILES)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES[:3])


def tokenizer_folder(name_or_path: str) -> str | None:
    """The local folder holding the tokenizer files of a folder or hub id (from the hub cache, or
    downloaded: only the tokenizer files); None when there is none."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return name_or_path if has_tokenizer(name_or_path) else None
    return _hub_tokenizer_folder(name_or_path)


@functools.lru_cache(maxsize=None)  # asked at every checkpoint; one look-up per run
def _hub_tokenizer_folder(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception:  # not a hub id, offline without a cached copy, ...: the caller saves what was loaded
        return None
    return folder if has_tokenizer(folder) else None


def load_tokenizer(name_or_path: str, **kwargs):
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``, made to give its SentencePiece model's ids
    where it has one (see the module docstring); raises TokenizerError where that cannot be done."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    folder = tokenizer_folder(name_or_path)
    if folder is not None and os.path.isfile(os.path.join(folder, SENTENCEPIECE_FILE)):
        match_sentencepiece(tokenizer, os.path.join(folder, SENTENCEPIECE_FILE))
    return tokenizer


def load_chat_tokenizer(name_or_path: str, chat_template: str | None = None, model_type: str | None = None,
                        trust_remote_code: bool = False):
    """``load_tokenizer`` with the chat template training and inference use (``templates.resolve_chat_template``:
    ``chat_template``, else the tokenizer's, else the model family's; ``model_type`` read from the folder's
    config.json when not given, none for a tokenizer alone) and a pad token."""
    from transformers import AutoConfig

    from .templates import apply_template, resolve_chat_template

    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model_type is None:
        try:
            model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
        except (OSError, ValueError):  # a tokenizer without a model config
            pass
    apply_template(tokenizer, resolve_chat_template(tokenizer, model_type, chat_template))
    return tokenizer


def match_sentencepiece(tokenizer, model_file: str) -> bool:
    """Make ``tokenizer`` give the ids of the SentencePiece model in ``model_file`` on every probe; True when
    its pipeline had to change (it is then marked ``sentencepiece_aligned``, and outputs carry the fixed one)."""
    import sentencepiece as spm

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer runs SentencePiece itself; the data path asks for a fast one
        return False
    processor = spm.SentencePieceProcessor(model_file=model_file)
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    probes = [text for text in PROBES if not any(token in text for token in special)]
    if first_difference(backend, processor, probes) is None:
        return False
    proto = _model_proto(processor)
    _set_sentencepiece_pipeline(tokenizer, proto)
    difference = first_difference(backend, processor, probes)
    if difference is not None:
        text, ours, theirs = difference
        raise TokenizerError(f"{model_file}: the tokenizer cannot be made to give the SentencePiece model's ids: "
                             f"{text!r} gives {ours} instead of {theirs}")
    tokenizer.add_prefix_space = proto.normalizer_spec.add_dummy_prefix
    tokenizer.sentencepiece_aligned = True
    return True


def first_difference(backend, processor, texts):
    """The first text whose ids differ between a ``tokenizers.Tokenizer`` and a SentencePieceProcessor, with
    both token lists; None when they agree on all."""
    for text in texts:
        ours = backend.encode(text, add_special_tokens=False).ids
        theirs = processor.encode(text)
        if ours != theirs:
            return text, [backend.id_to_token(i) for i in ours], [processor.id_to_piece(i) for i in theirs]
    return None


def _model_proto(processor):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    return proto


def _set_sentencepiece_pipeline(tokenizer, proto) -> None:
    """What SentencePiece does around its vocabulary: spaces become "▁", one "▁" is added at the start of the
    text only with ``add_dummy_prefix`` (never after an added token), and decoding undoes both.

    Pieces that SentencePiece merges from a character that is no piece itself (MiniCPM-2B: emoji with a skin
    tone, flags) become added tokens: a ``tokenizers`` BPE turns such a character into bytes before merging,
    so it never reaches them. (Runs of such emoji can still merge differently: see docs.)"""
    from tokenizers import AddedToken, decoders, pre_tokenizers

    backend, spec = tokenizer.backend_tokenizer, proto.normalizer_spec

    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if spec.add_dummy_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    if spec.name == "identity" and not spec.remove_extra_whitespaces:
        backend.normalizer = None  # other normalizations are left as loaded; the probes judge them
    merged_from_unknown = _pieces_merged_from_unknown_characters(proto)
    if merged_from_unknown:
        tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in merged_from_unknown])


def _pieces_merged_from_unknown_characters(proto) -> list[str]:
    """Normal pieces that SentencePiece's BPE builds by merging a character that is no piece itself: each is
    two parts, each part a single character or a piece it builds in turn."""
    vocabulary = {piece.piece for piece in proto.pieces}

    @functools.lru_cache(maxsize=None)
    def built(text: str) -> bool:
        if len(text) == 1:
            return True
        if text not in vocabulary:
            return False
        return all(char in vocabulary for char in text) or any(built(text[:k]) and built(text[k:])
                                                               for k in range(1, len(text)))

    return [piece.piece for piece in proto.pieces if piece.type == piece.NORMAL
            and any(char not in vocabulary for char in piece.piece) and built(piece.piece)]


def portable_settings(tokenizer) -> dict:
    """What an output's tokenizer_config.json says of an aligned tokenizer: the class that loads its
    tokenizer.json as it is; whether a text starts with "▁" (llama.cpp's converter reads it for Llama-layout
    models); its added tokens (the converter reads them here to keep user-defined pieces such as ``<td>``
    whole, and would otherwise split them)."""
    return {"tokenizer_class": PORTABLE_CLASS, "add_prefix_space": bool(tokenizer.add_prefix_space),
            "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                              "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                     for i, t in sorted(tokenizer.added_tokens_decoder.items())}}


def portable_tokenizer_json(tokenizer) -> str:
    """The tokenizer's ``tokenizer.json``, readable by the ``tokenizers`` of transformers 4.40 (0.19) too: BPE
    merges as "a b" strings (newer versions write pairs, which 0.19 rejects), no padding or truncation left
    from a call."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in piece for pair in merges for piece in pair):
        spec["model"]["merges"] = [" ".join(pair) for pair in merges]
    spec["padding"] = spec["truncation"] = None
    return json.dumps(spec, ensure_ascii=False, indent=1) + "\n"
