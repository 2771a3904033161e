"""Packaging and the checkout: the console script, the Python the lock needs, declared imports, and
output folders whose .gitignore a run never has to change."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from flows import console
from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_console_script_points_at_a_main_that_dispatches_every_entry_point(capsys):
    module, function = PYPROJECT["project"]["scripts"]["genai-pipeline"].split(":")
    assert getattr(importlib.import_module(module), function) is console.main
    assert console.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("run", "serve", "prepare", "features", "train FAMILY", "evaluate FAMILY", "report", "check",
                    "history"):
        assert f"genai-pipeline {command}" in usage
    assert console.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_the_console_script_runs_a_step_as_flows_cli_does(tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-m", "flows.console", "check"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "params.yaml is valid: families vae" in result.stderr
    result = subprocess.run([sys.executable, "-m", "flows.console", "train", "nosuch"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "family 'nosuch' is not under 'families'" in result.stderr


def test_requires_python_is_what_setup_sh_checks_and_networkx_is_declared():
    minimum = re.search(r"^MIN_PYTHON=(\S+)", (REPO_ROOT / "scripts" / "setup.sh").read_text(), re.M)[1]
    assert PYPROJECT["project"]["requires-python"] == f">={minimum}"
    declared = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0] for d in PYPROJECT["project"]["dependencies"]}
    assert "networkx" in declared  # flows/pipeline.py imports it directly


@pytest.mark.parametrize(("interpreter", "message"), [
    ("#!/bin/sh\necho 3.10\n", "is Python 3.10, but requirements.lock installs on Python 3.11 to 3.14 only"),
    ("#!/bin/sh\nexit 127\n", "cannot run"),
])
def test_setup_stops_with_a_clear_message_on_a_python_the_lock_cannot_install(tmp_path, interpreter, message):
    """A stand-in interpreter answers the version question as that Python would; setup stops before
    creating .venv or installing anything."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / "python3.10"
    python.write_text(interpreter)
    python.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                            env={"PYTHON": str(python), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / ".venv").exists()


@pytest.mark.parametrize("folder", ["data", "models", "evaluation", "reports"])
def test_output_folders_ignore_every_output_so_dvc_never_edits_their_gitignore(tmp_path, folder):
    """DVC appends an output to the .gitignore beside it unless git already ignores it (scmrepo's
    Git.ignore, which dvc commit and dvc checkout call): with these files it never has to."""
    from scmrepo.git import Git

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / folder).mkdir()
    shutil.copy(REPO_ROOT / folder / ".gitignore", tmp_path / folder / ".gitignore")
    before = (tmp_path / folder / ".gitignore").read_bytes()
    git = Git(str(tmp_path))
    for output in ("images", "a_new_family", "report.html", "summary.json"):
        assert git.ignore(str(tmp_path / folder / output)) is None
    assert (tmp_path / folder / ".gitignore").read_bytes() == before
    assert not git.is_ignored(str(tmp_path / folder / ".gitignore"))  # the file itself stays tracked
