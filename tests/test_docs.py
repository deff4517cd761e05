"""The README a newcomer reads in five minutes, the docs pages it links to: every relative link (and its
#anchor) resolves, and every flag of finetune.py and inference.py is documented."""

import dataclasses
import glob
import os
import re

import pytest
import transformers
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
PAGES = [README, os.path.join(ROOT, "bench", "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def text_outside_code(path):
    """The markdown of a page without its fenced code blocks."""
    with open(path, encoding="utf-8") as f:
        return re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)


def anchors(path):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text_outside_code(path), flags=re.M)}


def docs_text():
    return "\n".join(open(path, encoding="utf-8").read() for path in PAGES)


def test_the_readme_is_short_and_links_every_docs_page():
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        assert f"(docs/{os.path.basename(page)})" in readme, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(text_outside_code(page)):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_every_flag_of_finetune_py_is_documented():
    """The toolkit's own flags (its three dataclasses, beyond transformers' TrainingArguments, whose flags
    all work and are documented by transformers) each appear in the docs as --name."""
    from minicpm_finetune.training.arguments import DataArguments, ModelArguments, TrainingArguments

    inherited = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = [f.name for cls in (ModelArguments, DataArguments, TrainingArguments) for f in dataclasses.fields(cls)
            if f.name not in inherited]
    assert "use_lora" in ours and "eval_metrics" in ours
    text = docs_text()
    assert [name for name in ours if f"--{name}" not in text] == []
    assert "TrainingArguments" in text  # and the docs say that transformers' flags work too


def test_every_flag_of_inference_py_is_documented(capsys):
    from minicpm_finetune.evaluation.inference import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    flags = set(re.findall(r"--\w+", capsys.readouterr().out)) - {"--help"}
    assert "--model_name_or_path" in flags
    text = docs_text()
    assert sorted(flag for flag in flags if flag not in text) == []
