"""The command-line layer (minicpm_finetune/cli.py): error types, the one-line parser and exit, the atomic
writer, the local-path rule; and that every command reports bad input as one line with exit status 2 while
a bug keeps its traceback."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, run
from minicpm_finetune import cli
from minicpm_finetune.cli import ArgumentError, FinetuneError, atomic_path, command, looks_local, write_atomic


def test_the_project_errors_share_one_base():
    from minicpm_finetune.advertisegen import AdvertiseGenDataError
    from minicpm_finetune.data import DataError
    from minicpm_finetune.data.rendering import TemplateError
    from minicpm_finetune.export import ExportError
    from minicpm_finetune.cli import OutputDirError
    from minicpm_finetune.training.safety import NonFiniteLossError

    for error in (ArgumentError, DataError, TemplateError, ExportError, OutputDirError, NonFiniteLossError,
                  AdvertiseGenDataError):
        assert issubclass(error, FinetuneError), error
    assert not issubclass(FinetuneError, (ValueError, OSError, RuntimeError))  # a bug's exception is not one


def test_a_bad_flag_raises_one_line(capsys):
    parser = cli.OneLineParser(prog="x")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(ArgumentError, match="^argument --n: invalid int value: 'many'$"):
        parser.parse_args(["--n", "many"])
    assert capsys.readouterr().err == ""  # no usage text


def test_command_turns_only_project_errors_into_one_line_and_status_2(capsys, monkeypatch):
    @command
    def bad_input():
        raise FinetuneError("the data says no\nsecond line of the same report")

    @command
    def bug():
        raise ValueError("an internal mistake")

    with pytest.raises(SystemExit, match="^2$"):
        bad_input()
    assert capsys.readouterr().err == "error: the data says no\nsecond line of the same report\n"
    with pytest.raises(ValueError, match="an internal mistake") as info:  # the traceback is kept
        bug()
    assert info.traceback[-1].name == "bug"
    assert command(lambda: 7)() == 7

    monkeypatch.setenv("RANK", "1")  # other processes of a distributed run stay quiet
    with pytest.raises(SystemExit, match="^2$"):
        bad_input()
    assert capsys.readouterr().err == ""


def test_write_atomic_replaces_a_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    write_atomic(str(path), "old\n")
    write_atomic(str(path), (f"{i}\n" for i in range(3)))
    assert path.read_text() == "0\n1\n2\n"

    def lines():
        yield "half\n"
        raise RuntimeError("cut off")

    with pytest.raises(RuntimeError, match="cut off"):
        write_atomic(str(path), lines())
    assert path.read_text() == "0\n1\n2\n" and os.listdir(path.parent) == ["out.jsonl"]  # no temporary left


def test_atomic_path_writes_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_path(str(out), folder=True) as staging:
            (open(os.path.join(staging, "weights"), "w")).close()
            raise RuntimeError("killed mid-save")
    assert os.listdir(tmp_path) == []  # neither the folder nor its staging copy

    out.mkdir()  # an empty folder is replaced
    with atomic_path(str(out), folder=True) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and os.listdir(staging) == []
        with open(os.path.join(staging, "config.json"), "w") as f:
            f.write("{}")
        os.chmod(os.path.join(staging, "config.json"), 0o444)  # read-only files are flushed too
    assert os.listdir(out) == ["config.json"] and os.listdir(tmp_path) == ["model"]

    with pytest.raises(OSError):  # a folder with contents is never replaced behind the caller's back
        with atomic_path(str(out), folder=True) as staging:
            open(os.path.join(staging, "other"), "w").close()
    assert os.listdir(out) == ["config.json"] and os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("name, local", [
    ("owner/name", True), ("openbmb/MiniCPM-2B-sft-bf16", False), ("./model", True), ("/abs/model", True),
    ("~/model", True), ("a/b/c", True), ("model", True)])
def test_looks_local(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("owner/name")  # an existing folder is local even when it reads like a hub id
    assert looks_local(name) is local


def test_cli_is_import_light_and_answers_the_scripts_path_question(tmp_path):
    code = ("import sys; sys.path.insert(0, 'minicpm_finetune'); import cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout == "[]\n"
    script = os.path.join("minicpm_finetune", "cli.py")
    for path, status in (("./no-such-model", 2), ("owner/name", 0), (str(tmp_path), 0), (str(tmp_path / "x"), 2)):
        result = run([sys.executable, script, "check-model-path", path])
        assert result.returncode == status, (path, result.stderr)
        assert result.stderr == ("" if status == 0 else f"error: MODEL_PATH {path}: folder not found\n")


# Each command, given bad input, in-process: one line, exit status 2, no traceback.
def bad_inputs(tmp_path):
    missing = str(tmp_path / "missing")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"messages": [}\n')
    bad_data = str(bad_data)
    state = tmp_path / "run"
    state.mkdir()
    (state / "trainer_state.json").write_text("{not json")
    return {
        "advertisegen": (["minicpm_finetune.advertisegen", missing, str(tmp_path / "out")],
                         f"error: no such file or directory: {missing}"),
        "curves": (["minicpm_finetune.curves", str(state)], f"error: {state / 'trainer_state.json'}: invalid JSON"),
        "tiny": (["minicpm_finetune.tiny", "--output_dir", str(tmp_path / "tiny"), "--data", bad_data,
                  "--pretrain_steps", "0"], f"error: {bad_data}:1: malformed JSON"),
        "export": (["minicpm_finetune.export", "llama", "--model", missing, "--output_dir", str(tmp_path / "o")],
                   f"error: model folder not found: {missing}"),
        "inference": (["minicpm_finetune.evaluation.inference", "--model_name_or_path", missing],
                      f"error: --model_name_or_path {missing}: folder not found"),
        "data": (["minicpm_finetune.data", "--tokenizer", str(tmp_path), "--data", bad_data],
                 f"error: --tokenizer {tmp_path}: no tokenizer files"),
        "usage": (["minicpm_finetune.export", "merge"], "error: the following arguments are required"),
    }


@pytest.mark.parametrize("name", ["advertisegen", "curves", "tiny", "export", "inference", "data", "usage"])
def test_every_command_reports_bad_input_in_one_line_with_status_2(name, tmp_path, capsys):
    import importlib

    argv, start = bad_inputs(tmp_path)[name]
    main = importlib.import_module(argv[0]).main
    with pytest.raises(SystemExit, match="^2$"):
        main(argv[1:])
    err = capsys.readouterr().err
    assert err.startswith(start) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "tiny")


def test_finetune_main_keeps_a_bugs_traceback(tiny_model, data_dir, tmp_path, monkeypatch):
    from minicpm_finetune.training import finetune

    argv = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu",
            "--report_to", "none"]

    def broken(*args):
        raise ValueError("a bug in the data path")

    monkeypatch.setattr(finetune, "prepare_data", broken)
    with pytest.raises(ValueError, match="a bug in the data path"):  # not an `error:` line that hides where
        finetune.main(argv)


def test_parse_args_only_parses_and_checks(tiny_model, data_dir, tmp_path, capsys):
    from minicpm_finetune.training.arguments import ModelArguments, parse_args

    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(out), "--use_cpu",
            "--report_to", "none", "--resume_from_checkpoint", "true"]
    model_args, _, training_args = parse_args(argv)
    assert training_args.resume_from_checkpoint == "true"  # resolved by finetune.main, not here
    assert capsys.readouterr().out == "" and not out.exists()
    assert ModelArguments(model_name_or_path=tiny_model, qlora=True).use_lora  # visible where the flags are made
    with pytest.raises(ArgumentError, match="^--lora_r given without --use_lora"):
        ModelArguments(model_name_or_path=tiny_model, lora_r=4)


def test_finetune_main_resolves_resume_before_anything_loads(tiny_model, data_dir, tmp_path, capsys, monkeypatch):
    from minicpm_finetune.training import finetune

    monkeypatch.setattr(finetune, "load_tokenizer_of", lambda *_: pytest.fail("loaded before the resume check"))
    argv = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu",
            "--report_to", "none", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit, match="^2$"):
        finetune.main(argv)
    assert capsys.readouterr().err == (f"error: --resume_from_checkpoint latest: no complete checkpoint-N folder in "
                                       f"--output_dir {tmp_path / 'out'}\n")


def test_bad_chat_template_is_one_line_in_every_command(tiny_model, data_dir, tmp_path, capsys):
    from minicpm_finetune import data as data_command
    from minicpm_finetune.data.templates import TEMPLATES
    from minicpm_finetune.evaluation import inference
    from minicpm_finetune.training import finetune

    expected = f"error: --chat_template 'nonesuch' is neither one of {sorted(TEMPLATES)} nor a file\n"
    commands = [
        (finetune.main, ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
                         "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
                         "--use_cpu", "--report_to", "none"]),
        (inference.main, ["--model_name_or_path", tiny_model, "--prompt", "你好"]),
        (data_command.main, ["--tokenizer", tiny_model, "--data", str(data_dir / "dev.jsonl")]),
    ]
    for main, argv in commands:
        capsys.readouterr()
        with pytest.raises(SystemExit, match="^2$"):
            main(argv + ["--chat_template", "nonesuch"])
        assert capsys.readouterr().err == expected, main
