"""Same seed and config on the CPU => identical data, weights, samples and metrics.

Two separate processes (different hash seeds) run prepare -> features -> train -> evaluate
for an image and a text family in two fresh workspaces; every output is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tasks.checkpoints import load_torch
from tests.conftest import REPO_ROOT
from tests.pipeline_repo import tiny_params

FAMILIES = ("vae", "transformer_lm")
STEPS = ["prepare image", "features", "train vae", "evaluate vae",
         "prepare text", "train transformer_lm", "evaluate transformer_lm"]
RUN_STEPS = ("import sys; from flows.cli import run; from tasks.runtime import setup_logging; "
             "setup_logging(); [run(step.split()) for step in sys.argv[1:]]")


def _start(workspace: Path, hash_seed: str) -> subprocess.Popen:
    workspace.mkdir()
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params(FAMILIES), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GENAI_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONHASHSEED=hash_seed)
    return subprocess.Popen([sys.executable, "-c", RUN_STEPS, *STEPS], cwd=workspace, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_and_config_give_identical_weights_and_metrics(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    processes = [_start(first, "1"), _start(second, "2")]  # side by side: two single-threaded processes
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]

    for modality in ("images", "text"):
        assert _files(first / "data" / modality) == _files(second / "data" / modality)
    for family in FAMILIES:
        a = load_torch(first / "models" / family / "model.pt")["state_dict"]
        b = load_torch(second / "models" / family / "model.pt")["state_dict"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{family}: {name} differs between identical runs"
        metrics = [json.loads((root / "metrics" / f"{family}.json").read_text()) for root in (first, second)]
        assert metrics[0] == metrics[1] and metrics[0], family
        samples = [{k: v for k, v in _files(root / "evaluation" / family).items() if k.startswith("samples")}
                   for root in (first, second)]
        assert samples[0] == samples[1] and samples[0], family
