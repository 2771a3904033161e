"""``python -m flows.deploy``: the schedule comes from params.yaml or the command line, the overlap
policy is set on the deployment, and bad input stops it before anything is served.

Serving for real, against a running Prefect server, is tests/test_orchestration.py (slow).
"""

from __future__ import annotations

import shutil

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.deploy as deploy
from tests.conftest import REPO_ROOT


@pytest.fixture
def served(tmp_path, monkeypatch) -> list[dict]:
    """Run ``main`` in a copy of params.yaml with a server configured; collects what would be served."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    calls: list[dict] = []
    monkeypatch.setattr(deploy.scheduled_retraining, "serve", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(deploy, "pause", lambda name: calls.append({"paused": name}))
    return calls


def main(*argv: str, api: str | None = "http://127.0.0.1:9/api") -> int:
    with temporary_settings(updates={PREFECT_API_URL: api}):
        return deploy.main(list(argv))


def test_the_cron_comes_from_params_yaml_by_default(served, tmp_path):
    assert main() == 0
    kwargs, paused = served
    assert paused == {"paused": "genai-retraining/scheduled-retraining"}  # once serving stops
    assert kwargs["cron"] == "0 3 * * *" and "interval" not in kwargs
    assert kwargs["parameters"] == {"repo_root": str(tmp_path), "params_file": "params.yaml", "overrides": []}
    limit = kwargs["global_limit"]
    assert limit.limit == 1 and limit.collision_strategy.value == "CANCEL_NEW"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--cron", "30 4 * * 1"], {"cron": "30 4 * * 1"}),
    (["--interval", "45"], {"interval": 45.0}),
])
def test_the_command_line_overrides_the_schedule(served, argv, expected):
    assert main(*argv) == 0
    kwargs = served[0]
    [other] = {"cron", "interval"} - set(expected)
    assert {k: kwargs[k] for k in expected} == expected and other not in kwargs


def test_a_bad_cron_or_no_server_stops_before_serving(served, capsys):
    assert main("--cron", "every night") == 2
    assert "not a cron expression" in capsys.readouterr().err
    assert main(api=None) == 2
    assert "prefect server start" in capsys.readouterr().err
    assert served == []


def test_overrides_go_to_every_scheduled_run_and_a_bad_one_stops_before_serving(served, capsys):
    assert main("-S", "families.vae.train.steps=100", "-S", "seed=3") == 0
    assert served[0]["parameters"]["overrides"] == ["families.vae.train.steps=100", "seed=3"]
    served.clear()
    assert main("-S", "families.vae.train.stepz=1") == 2
    assert "-S families.vae.train.stepz=1: Could not override" in capsys.readouterr().err
    assert served == []
