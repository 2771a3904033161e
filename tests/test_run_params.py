"""A run's params: ``-S`` overrides and ``--params FILE`` become params.yaml for the run and the
checkout's own file comes back afterwards, even after a failure or a kill; bad overrides are one
clear error before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from flows import overrides
from flows.pipeline import check_inputs
from tasks.config import ParamsError
from tests.conftest import REPO_ROOT


@pytest.fixture
def checkout(tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_overrides_use_dvc_exp_run_syntax_and_keep_comments(checkout):
    text = overrides.run_params(checkout, "params.yaml", ["families.vae.train.steps=100", "seeds=[0,1]"])
    params = yaml.safe_load(text)
    assert params["families"]["vae"]["train"]["steps"] == 100 and params["seeds"] == [0, 1]
    assert "# The single configuration of the pipeline." in text  # DVC's YAML writer keeps the comments
    assert (checkout / "params.yaml").read_bytes() == (REPO_ROOT / "params.yaml").read_bytes()  # not touched
    assert overrides.run_params(checkout) is None  # no override: params.yaml as it is


def test_a_bad_override_is_one_error_naming_it(checkout):
    with pytest.raises(ParamsError, match=r"-S families.vae.train.stepz=100: Could not override "
                                          r"'families.vae.train.stepz'"):
        check_inputs(checkout, "params.yaml", ["families.vae.train.stepz=100"])
    with pytest.raises(ParamsError, match=r"-S families.vae.train.steps: .*missing EQUAL"):
        check_inputs(checkout, "params.yaml", ["families.vae.train.steps"])
    with pytest.raises(ParamsError, match=r"params.yaml with -S families.vae.train.steps=-5: "
                                          r"families.vae.train.steps: Input should be greater than 0 \(got -5\)"):
        check_inputs(checkout, "params.yaml", ["families.vae.train.steps=-5"])
    with pytest.raises(ParamsError, match="other.yaml: file not found"):
        check_inputs(checkout, "other.yaml")


def test_the_run_params_are_params_yaml_for_the_run_and_the_checkouts_come_back(checkout):
    original = (checkout / "params.yaml").read_bytes()
    text = overrides.run_params(checkout, "params.yaml", ["families.vae.train.steps=7"])
    with pytest.raises(RuntimeError, match="a stage failed"):
        with overrides.params_in_place(checkout, text):
            # what a stage (python -m flows.cli ...) reads while the run works
            check = subprocess.run([sys.executable, "-c", "from tasks.config import load_params; "
                                    "print(load_params().families['vae'].train.steps)"],
                                   cwd=checkout, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)})
            assert check.stdout.strip() == "7", check.stderr
            raise RuntimeError("a stage failed")
    assert (checkout / "params.yaml").read_bytes() == original
    assert not (checkout / overrides.BACKUP).exists() and not (checkout / overrides.WRITTEN).exists()


def test_params_file_runs_with_that_file(checkout):
    other = yaml.safe_load((checkout / "params.yaml").read_text())
    other["seed"] = 5
    (checkout / "other.yaml").write_text(yaml.safe_dump(other))
    assert check_inputs(checkout, "other.yaml").seed == 5
    assert check_inputs(checkout, "other.yaml", ["seed=6"]).seed == 6
    text = overrides.run_params(checkout, "other.yaml", [])
    with overrides.params_in_place(checkout, text):
        assert yaml.safe_load((checkout / "params.yaml").read_text())["seed"] == 5
    assert yaml.safe_load((checkout / "params.yaml").read_text())["seed"] == 0


def _killed_while_in_place(checkout, override):
    """A process that puts the run's params in place and is killed (SIGKILL) before it puts them back."""
    code = ("import os, signal; from pathlib import Path; from flows import overrides; "
            f"text = overrides.run_params(Path('.'), 'params.yaml', [{override!r}]); "
            "held = overrides.params_in_place(Path('.'), text); held.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", code], cwd=checkout, env={"PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True)
    assert result.returncode == -9, result.stderr


def test_a_killed_runs_params_are_put_back_by_the_next_run(checkout):
    original = (checkout / "params.yaml").read_bytes()
    _killed_while_in_place(checkout, "seed=9")
    assert b"seed: 9" in (checkout / "params.yaml").read_bytes()
    assert "the checkout's own params.yaml is back" in overrides.restore_left_behind(checkout)
    assert (checkout / "params.yaml").read_bytes() == original
    assert overrides.restore_left_behind(checkout) is None


def test_a_params_yaml_edited_after_a_killed_run_is_left_alone(checkout):
    _killed_while_in_place(checkout, "seed=9")
    (checkout / "params.yaml").write_text((checkout / "params.yaml").read_text().replace("seed: 9", "seed: 11"))
    message = overrides.restore_left_behind(checkout)
    assert "edited since: it is left as it is" in message and str(overrides.BACKUP) in message
    assert b"seed: 11" in (checkout / "params.yaml").read_bytes()
    assert (checkout / overrides.BACKUP).read_bytes() == (REPO_ROOT / "params.yaml").read_bytes()
