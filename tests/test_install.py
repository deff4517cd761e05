"""pyproject.toml: `pip install .` and `pip install -e .` give the package and its console scripts, and the
requirements leave torch to the user (offline here: no build isolation, no dependency resolution; the
requirements come from this interpreter, whose packages the virtual environment sees)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # pip installs into a fresh virtual environment

SCRIPTS = ["minicpm-finetune", "minicpm-inference", "minicpm-export", "minicpm-data", "minicpm-advertisegen",
           "minicpm-curves", "minicpm-tiny"]
CHECK = """
import importlib.metadata as m, os, minicpm_finetune
print(os.path.dirname(minicpm_finetune.__file__))
print(";".join(m.requires("minicpm-finetune")))
"""


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
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python, bin_dir = str(venv / "bin" / "python"), venv / "bin"
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
        assert location.startswith(str(venv)) and os.path.isfile(os.path.join(location, "modeling_minicpm.py"))
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
