"""AdvertiseGen: raw-to-conversation conversion, its CLI, and the committed synthetic sample."""

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from minicpm_finetune.advertisegen import (
    AdvertiseGenDataError,
    convert_file,
    convert_record,
    sha256sum,
    verify_archive,
)


DATA_DIR = os.path.join(ROOT, "data", "advertisegen")
GENERATOR = os.path.join(ROOT, "scripts", "make_advertisegen_sample.py")
SPLIT_FILES = ("train.jsonl", "dev.jsonl", "test.jsonl")

GOOD = {"content": "类型#裙*颜色#白色", "summary": "这款连衣裙很好看。"}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_advertisegen_sample", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "minicpm_finetune.advertisegen", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


# --- convert_record -------------------------------------------------------------------------

def test_convert_record_without_system():
    assert convert_record(GOOD) == {"messages": [
        {"role": "user", "content": GOOD["content"]},
        {"role": "assistant", "content": GOOD["summary"]},
    ]}


def test_convert_record_with_system_and_empty_system():
    out = convert_record(GOOD, system="你是广告文案助手")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]
    assert out["messages"][0]["content"] == "你是广告文案助手"
    # An empty system prompt adds no empty system message.
    assert [m["role"] for m in convert_record(GOOD, system="")["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("record", [
    {"summary": "x"}, {"content": "x", "summary": 1}, {"content": "  ", "summary": "x"}, ["x"],
])
def test_convert_record_rejects_bad_records(record):
    with pytest.raises(ValueError):
        convert_record(record)


# --- convert_file ---------------------------------------------------------------------------

def test_convert_file_jsonl(tmp_path):
    src, dst = tmp_path / "train.json", tmp_path / "out" / "train.jsonl"
    other = {"content": "类型#裤", "summary": "这款长裤很利落。"}
    # The real download is JSON Lines named .json; a blank trailing line is fine.
    write_text(src, json.dumps(GOOD, ensure_ascii=False) + "\n" + json.dumps(other) + "\n\n")
    assert convert_file(str(src), str(dst), system="S") == {"converted": 2, "bad": 0}
    rows = read_jsonl(dst)
    assert rows == [convert_record(GOOD, "S"), convert_record(other, "S")]
    # Written as UTF-8 text, not \u escapes.
    assert "连衣裙" in dst.read_text(encoding="utf-8")
    assert [p.name for p in dst.parent.iterdir()] == ["train.jsonl"]  # no temp file left


def test_convert_file_json_array(tmp_path):
    src, dst = tmp_path / "dev.json", tmp_path / "dev.jsonl"
    write_text(src, json.dumps([GOOD, GOOD], ensure_ascii=False, indent=2))
    assert convert_file(str(src), str(dst)) == {"converted": 2, "bad": 0}
    assert read_jsonl(dst) == [convert_record(GOOD)] * 2


BAD_JSONL = "\n".join([
    json.dumps(GOOD),                      # 1 ok
    '{"content": "a", "summary": ',        # 2 malformed JSON
    "[1, 2]",                              # 3 not an object
    '{"content": "a"}',                    # 4 missing summary
    '{"content": 5, "summary": "b"}',      # 5 non-string content
    '{"content": "a", "summary": ""}',     # 6 empty summary
    json.dumps(GOOD),                      # 7 ok
]) + "\n"


def test_bad_lines_reported_with_file_and_line_and_nothing_written(tmp_path):
    src, dst = tmp_path / "train.jsonl", tmp_path / "out.jsonl"
    write_text(src, BAD_JSONL)
    write_text(dst, "old contents\n")
    with pytest.raises(AdvertiseGenDataError) as info:
        convert_file(str(src), str(dst))
    err = info.value
    assert isinstance(err, ValueError)
    assert [p.split(": ", 1)[0] for p in err.problems] == [f"{src}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "malformed JSON" in err.problems[0]
    assert "expected a JSON object" in err.problems[1]
    assert 'missing "summary"' in err.problems[2]
    assert '"content" must be a string' in err.problems[3]
    assert '"summary" is empty' in err.problems[4]
    assert all("\n" not in p for p in err.problems)  # one line per bad record
    assert str(err).startswith(f"5 bad record(s) in {src}")
    assert dst.read_text() == "old contents\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "train.jsonl"]


def test_error_lists_first_20_and_counts_the_rest(tmp_path):
    src = tmp_path / "train.jsonl"
    write_text(src, "not json\n" * 25)
    with pytest.raises(AdvertiseGenDataError) as info:
        convert_file(str(src), str(tmp_path / "out.jsonl"))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("25 bad record(s)")
    assert lines[1].startswith(f"{src}:1: malformed JSON") and lines[20].startswith(f"{src}:20:")
    assert lines[21] == "... and 5 more" and len(lines) == 22
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_array_element_reports_record_number(tmp_path):
    src = tmp_path / "dev.json"
    write_text(src, json.dumps([GOOD, {"content": "a"}]))
    with pytest.raises(AdvertiseGenDataError) as info:
        convert_file(str(src), str(tmp_path / "out.jsonl"))
    assert info.value.problems == [f'{src}: record 2: missing "summary"']


def test_skip_bad_counts_and_logs(tmp_path, caplog):
    src, dst = tmp_path / "train.jsonl", tmp_path / "out.jsonl"
    write_text(src, BAD_JSONL)
    with caplog.at_level(logging.WARNING, logger="minicpm_finetune.advertisegen"):
        counts = convert_file(str(src), str(dst), skip_bad=True)
    assert counts == {"converted": 2, "bad": 5}
    assert read_jsonl(dst) == [convert_record(GOOD)] * 2
    assert f"{src}:3: expected a JSON object" in caplog.text


def test_sha256sum_and_verify_archive(tmp_path):
    path = tmp_path / "AdvertiseGen.tar.gz"
    path.write_bytes(b"not really an archive")
    digest = hashlib.sha256(b"not really an archive").hexdigest()
    assert sha256sum(str(path)) == digest
    assert verify_archive(str(path), digest.upper()) == digest
    with pytest.raises(ValueError, match="mismatch"):
        verify_archive(str(path), "0" * 64)
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_archive(str(path), "abc")


# --- CLI ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_converts_splits_with_system(tmp_path):
    src, out = tmp_path / "AdvertiseGen", tmp_path / "chat"
    src.mkdir()
    write_text(src / "train.json", json.dumps(GOOD) + "\n")
    write_text(src / "dev.jsonl", json.dumps([GOOD, GOOD]))
    result = run_cli(str(src), str(out), "--system", "S")
    assert result.returncode == 0, result.stderr
    assert "train: 1 converted" in result.stdout and "dev: 2 converted" in result.stdout
    assert sorted(os.listdir(out)) == ["dev.jsonl", "train.jsonl"]
    assert read_jsonl(out / "train.jsonl") == [convert_record(GOOD, "S")]


@pytest.mark.slow
def test_cli_missing_input_is_one_error_line(tmp_path):
    result = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: no such file or directory: {tmp_path / 'nope'}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(str(empty), str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: no train/dev")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_bad_split_writes_no_split(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "chat"
    src.mkdir()
    write_text(src / "train.jsonl", json.dumps(GOOD) + "\n")  # good, but must not be written
    write_text(src / "dev.jsonl", BAD_JSONL)
    result = run_cli(str(src), str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: 5 bad record(s)")
    assert f"{src / 'dev.jsonl'}:2: malformed JSON" in result.stderr
    assert not out.exists()

    result = run_cli(str(src), str(out), "--skip_bad")
    assert result.returncode == 0, result.stderr
    assert "dev: 2 converted, skipped 5 bad" in result.stdout
    assert len(read_jsonl(out / "dev.jsonl")) == 2 and len(read_jsonl(out / "train.jsonl")) == 1


# --- synthetic sample -----------------------------------------------------------------------

@pytest.mark.slow
def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run([sys.executable, GENERATOR, "--output_dir", str(out), "--seed", "42"],
                       check=True, capture_output=True, timeout=120)
        outputs.append({f: (out / f).read_bytes() for f in SPLIT_FILES})
    committed = {f: open(os.path.join(DATA_DIR, f), "rb").read() for f in SPLIT_FILES}
    assert outputs[0] == outputs[1] == committed
    # Another seed draws other contents.
    assert load_generator().make_sample(7)["test"] != load_generator().make_sample(42)["test"]


def test_committed_sample_sizes_and_derivable_summaries():
    gen = load_generator()
    splits = {f: read_jsonl(os.path.join(DATA_DIR, f)) for f in SPLIT_FILES}
    assert {f: len(r) for f, r in splits.items()} == {
        "train.jsonl": 2000, "dev.jsonl": 100, "test.jsonl": 100}
    assert sum(os.path.getsize(os.path.join(DATA_DIR, f)) for f in SPLIT_FILES) < 1_000_000

    contents = [r["content"] for records in splits.values() for r in records]
    assert len(set(contents)) == len(contents)  # dev/test contents never appear in train
    for records in splits.values():
        for record in records:
            assert set(record) == {"content", "summary"}
            pairs = [pair.split("#") for pair in record["content"].split("*")]
            assert 2 <= len(pairs) <= 4 and pairs[0][0] == "类型"
            # Every attribute value's phrase appears, in attribute order.
            positions = [record["summary"].index(gen.PHRASES[k][v]) for k, v in pairs]
            assert positions == sorted(positions)
            assert record["summary"] == gen.summary_for(record["content"])
            assert 30 <= len(record["summary"]) <= 80


def test_committed_sample_converts(tmp_path):
    counts = convert_file(os.path.join(DATA_DIR, "test.jsonl"), str(tmp_path / "test.jsonl"))
    assert counts == {"converted": 100, "bad": 0}


def test_unicode_line_separators_inside_strings_are_text(tmp_path):
    """U+2028/U+2029 (and NEL, form feed) are valid raw inside JSON strings: the record stays whole and the
    line numbers after it do not shift."""
    odd = {"content": "类型#裙\u2028风格#文艺", "summary": "第一段\u2029第二段\x85\x0c完"}
    src = tmp_path / "train.json"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (odd, GOOD, {"content": "x"})) + "\n",
                   encoding="utf-8")
    with pytest.raises(AdvertiseGenDataError) as info:
        convert_file(str(src), str(tmp_path / "out.jsonl"))
    assert info.value.problems == [f'{src}:3: missing "summary"']
    assert convert_file(str(src), str(tmp_path / "out.jsonl"), skip_bad=True) == {"converted": 2, "bad": 1}
    assert read_jsonl(tmp_path / "out.jsonl")[0] == convert_record(odd)
