"""pyproject.toml: `pip install .` and `pip install -e .` give the package and its console scripts, and the
requirements leave torch to the user (offline here: no build isolation, no dependency resolution; pip, the
build tools and the requirements come from the running interpreter, whose site-packages the new virtual
environment sees through a .pth file: the same whether the tests run in a plain interpreter or in a virtual
environment of their own, where ``--system-site-packages`` would show the base interpreter's packages)."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
CI = os.path.join(ROOT, ".ci", "run")

SCRIPTS = ["minicpm-finetune", "minicpm-inference", "minicpm-export", "minicpm-data", "minicpm-advertisegen",
           "minicpm-curves", "minicpm-tiny"]
CHECK = """
import importlib.metadata as m, os, minicpm_finetune
print(os.path.dirname(minicpm_finetune.__file__))
print(";".join(m.requires("minicpm-finetune")))
"""


def test_ci_runs_the_readme_commands_as_written_in_a_fresh_virtual_environment():
    with open(README, encoding="utf-8") as f:
        section = f.read().split("## Install and test", 1)[1]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert commands == ['pip install torch==2.13.0 && pip install -e ".[dev]"', "python -m pytest tests -q"]
    assert "python3 -m venv .venv && . .venv/bin/activate" in section
    with open(CI, encoding="utf-8") as f:
        steps = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    fresh = [steps.index("rm -rf .venv"), steps.index("python3 -m venv .venv"), steps.index(". .venv/bin/activate")]
    assert fresh == sorted(fresh) and fresh[-1] < steps.index(commands[0]) < steps.index(commands[1])
    assert steps[-1] == commands[1]  # the tests are the last step: their status is CI's


@pytest.mark.slow  # pip installs into a fresh virtual environment
@pytest.mark.parametrize("editable", [False, True])
def test_pip_install_gives_the_package_and_its_commands(tmp_path, editable):
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(os.path.join(ROOT, "minicpm_finetune"), source / "minicpm_finetune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # Without a pip of its own, the environment runs this interpreter's pip and setuptools (offline).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    seen = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(seen, "running-interpreter.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index",
               *(["-e"] if editable else []), str(source)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    outside = tmp_path / "elsewhere"  # not the repository: the package comes from the installation
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, "-c", CHECK], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    location, requires = result.stdout.strip().splitlines()[-2:]
    if editable:
        assert location == str(source / "minicpm_finetune")
    else:
        assert location.startswith(str(venv))  # and every stage package with it, the shipped model code too
        for module in ("models/modeling_minicpm.py", "data/__main__.py", "evaluation/inference.py",
                       "export/__main__.py", "training/finetune.py"):
            assert os.path.isfile(os.path.join(location, module)), module
    names = [r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requires.split(";")]
    assert "transformers" in names and "peft" in names and "torch" not in names, names  # torch: the user's build

    for script in SCRIPTS:
        assert os.access(bin_dir / script, os.X_OK), script
    result = subprocess.run([str(bin_dir / "minicpm-export"), "merge", "--adapter", "nowhere", "--output_dir", "x"],
                            cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == "error: adapter folder not found: nowhere"
    if not editable:  # the same entry points either way; one full run of the heaviest command is enough
        result = subprocess.run([str(bin_dir / "minicpm-finetune"), "--help"], cwd=outside, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "--use_lora" in result.stdout, result.stderr[-2000:]
