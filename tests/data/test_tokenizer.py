"""Token ids are the SentencePiece model's, checked against ``sentencepiece`` itself (never against the
transformers tokenizer the toolkit builds on): on a tokenizer laid out as MiniCPM-2B's (tokenizer.model,
``legacy: true``, no dummy prefix, punctuation, "\\n" and HTML tags as user-defined pieces), for what the
toolkit trains on, previews, prompts with and saves. The transformers 4.40 check of every output kind is in
test_portable.py."""

import json
import os
import shutil

import pytest
import sentencepiece as spm
from conftest import ROOT, mixed_text_corpus
from transformers import AutoTokenizer

from minicpm_finetune.data import encode
from minicpm_finetune.data import main as preview_main
from minicpm_finetune.export.portable import save_tokenizer
from minicpm_finetune.evaluation.prompts import prompt_ids
from minicpm_finetune.data.templates import MINICPM_TEMPLATE, apply_template
from minicpm_finetune.tiny import build_tokenizer
from minicpm_finetune.data.tokenizer import PORTABLE_CLASS, TokenizerError, load_tokenizer

CORPUS = mixed_text_corpus()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A MiniCPM-2B-style tokenizer trained on half the corpus (so it has merges for its words)."""
    folder = str(tmp_path_factory.mktemp("sp") / "base")
    build_tokenizer(folder, CORPUS[::2], vocab_size=2000)
    return folder


def sentencepiece(folder):
    return spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))


def ids(tokenizer, text):
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def reference_ids(tokenizer, processor, text):
    """The truth for a rendered conversation: the template's special tokens by id, the text between them
    encoded by SentencePiece."""
    out, rest = [], text
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    while rest:
        hits = [(rest.find(s), s) for s in specials if s in rest]
        at, special = min(hits) if hits else (len(rest), None)
        out += processor.encode(rest[:at])
        if special is None:
            break
        out.append(tokenizer.convert_tokens_to_ids(special))
        rest = rest[at + len(special):]
    return out


def test_the_corpus_is_large_and_mixed():
    assert len(CORPUS) >= 1000
    for piece in ("，", "。", "<用户>", "\n", "  ", "<td>", "😀", "2026"):
        assert sum(piece in text for text in CORPUS) >= 20, piece


def test_transformers_5_alone_puts_a_space_after_user_defined_pieces(base):
    """The failure this module guards against, reproduced: plain AutoTokenizer on MiniCPM-2B's layout."""
    plain, processor = AutoTokenizer.from_pretrained(base), sentencepiece(base)
    tokens = plain.convert_ids_to_tokens(ids(plain, "好的，是的。"))
    assert tokens[tokens.index("，") + 1] == "▁"  # a space that is not in the text
    wrong = sum(ids(plain, text) != processor.encode(text) for text in CORPUS)
    assert wrong > len(CORPUS) // 2, wrong


def test_loaded_tokenizer_gives_sentencepiece_ids_on_every_line(base):
    tokenizer, processor = load_tokenizer(base), sentencepiece(base)
    assert tokenizer.sentencepiece_aligned
    wrong = [text for text in CORPUS if ids(tokenizer, text) != processor.encode(text)]
    assert wrong == []
    # Decoding gives the text back: no space inserted after punctuation, none dropped at the start.
    assert [tokenizer.decode(processor.encode(text)) for text in CORPUS] == CORPUS


def test_training_and_prompt_ids_are_sentencepiece_ids_between_special_tokens(base):
    tokenizer, processor = load_tokenizer(base), sentencepiece(base)
    apply_template(tokenizer, MINICPM_TEMPLATE)
    for k in range(0, 600, 3):
        messages = [{"role": "system", "content": CORPUS[k]}, {"role": "user", "content": CORPUS[k + 1]},
                    {"role": "assistant", "content": CORPUS[k + 2] or "好的。"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert encode(tokenizer, messages)["input_ids"] == reference_ids(tokenizer, processor, rendered), rendered
        prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert prompt_ids(tokenizer, messages[:2]) == reference_ids(tokenizer, processor, prompt), prompt


def test_preview_of_the_advertisegen_sample_shows_the_text_as_it_is(tiny_model, capsys):
    data = os.path.join(ROOT, "data", "advertisegen_chat", "dev.jsonl")
    assert preview_main(["--tokenizer", tiny_model, "--data", data]) == 0
    shown = capsys.readouterr().out.split("First sample (learned tokens in [[...]], the rest is masked):\n")[1]
    with open(data, encoding="utf-8") as f:
        first = json.loads(f.readline())["messages"]
    assert shown.strip() == f"<s><用户>{first[0]['content']}<AI>[[{first[1]['content']}</s>]]"
    assert "， " not in shown and "。 " not in shown


def test_saved_tokenizer_loads_with_sentencepiece_ids_in_plain_transformers(base, tmp_path):
    tokenizer = load_tokenizer(base)
    apply_template(tokenizer, MINICPM_TEMPLATE)
    save_tokenizer(tokenizer, str(tmp_path))
    assert (tmp_path / "tokenizer.model").read_bytes() == open(os.path.join(base, "tokenizer.model"), "rb").read()
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert settings["tokenizer_class"] == PORTABLE_CLASS and settings["chat_template"] == MINICPM_TEMPLATE
    # For llama.cpp's converter: no "▁" at the start of a text; user-defined pieces typed as such, kept whole.
    assert settings["add_prefix_space"] is False
    added = {entry["content"]: entry["special"] for entry in settings["added_tokens_decoder"].values()}
    assert added["，"] is False and added["<td>"] is False and added["</s>"] is True
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert all(isinstance(merge, str) for merge in merges)  # the form the tokenizers of transformers 4.40 reads
    reloaded, processor = AutoTokenizer.from_pretrained(tmp_path), sentencepiece(base)
    assert [ids(reloaded, text) for text in CORPUS] == [processor.encode(text) for text in CORPUS]
    assert reloaded("好的，是的。").input_ids == [reloaded.bos_token_id] + processor.encode("好的，是的。")
    assert reloaded.chat_template == MINICPM_TEMPLATE and reloaded.pad_token == "<unk>"
    # Loaded again by the toolkit it already agrees, so it is kept as it is.
    assert not getattr(load_tokenizer(str(tmp_path)), "sentencepiece_aligned", False)


def test_a_tokenizer_json_without_sentencepiece_model_is_kept_as_it_is(tiny_chatml_model):
    tokenizer = load_tokenizer(tiny_chatml_model)
    assert not getattr(tokenizer, "sentencepiece_aligned", False)
    plain = AutoTokenizer.from_pretrained(tiny_chatml_model)
    assert tokenizer.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()


def test_a_tokenizer_that_cannot_agree_is_one_line(base, tiny_chatml_model, tmp_path, capsys):
    """A tokenizer.json whose vocabulary is not its tokenizer.model's: no pipeline makes them agree."""
    folder = tmp_path / "mismatched"
    shutil.copytree(tiny_chatml_model, folder)
    shutil.copyfile(os.path.join(base, "tokenizer.model"), folder / "tokenizer.model")
    with pytest.raises(TokenizerError, match="cannot be made to give the SentencePiece model's ids"):
        load_tokenizer(str(folder))
    with pytest.raises(SystemExit) as exit_:
        preview_main(["--tokenizer", str(folder), "--data", os.path.join(ROOT, "data", "advertisegen", "dev.jsonl")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}/tokenizer.model: the tokenizer cannot"), lines
