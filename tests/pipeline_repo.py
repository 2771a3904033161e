"""Throw-away copies of the pipeline for tests that run its real entry points.

``make_repo`` builds a git + DVC repository in a temporary folder with the project's code,
a tiny ``params.yaml`` and a ``dvc.yaml`` cut down to a few families (every stage and
dependency of the others removed), so flow, DVC and scheduling tests stay quick while
exercising the real stage definitions.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import yaml

from tests.conftest import REPO_ROOT, TINY_CONFIGS

PYTHON = sys.executable
# What a copy needs from the checkout to run the pipeline.
CODE = ["flows", "tasks", "genai_models", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore",
        "pyproject.toml", "data/.gitignore", "models/.gitignore", "evaluation/.gitignore", "reports/.gitignore"]
FAMILIES = tuple(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["families"])


def tiny_pipeline_params() -> dict:
    """The project's params.yaml shrunk to seconds per stage: tiny models, few steps, few samples."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["images"]["max_train"] = 300
    params["data"]["text"]["max_train"] = 300
    params["features"]["classifier"]["steps"] = 40
    for name, block in params["families"].items():
        block["model"] = dict(TINY_CONFIGS[name])
        block["train"].update(steps=10, batch_size=32, log_every=5, checkpoint_every=5, num_samples=16, eval_every=10,
                              warmup_steps=min(block["train"].get("warmup_steps", 0), 2))
        block["train"].pop("keep_best", None)
    params["evaluate"].update(num_image_samples=100, iw_samples=4, num_text_samples=20, batch_size=50,
                              bootstrap=20, curve_samples=30, kid_subsets=5, kid_subset_size=50)
    return params


def dvc_yaml_for(families: Iterable[str]) -> dict:
    """The project's dvc.yaml with only ``families``' stages and the dependencies on them."""
    keep = set(families)
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    dropped = set(FAMILIES) - keep
    pattern = re.compile(r"(^|/)(" + "|".join(map(re.escape, sorted(dropped))) + r")(/|\.json$|$)") if dropped else None

    def about_dropped(entry) -> bool:
        path = entry if isinstance(entry, str) else next(iter(entry))
        return bool(pattern and pattern.search(str(path)))

    stages = {}
    for name, stage in spec["stages"].items():
        stage = dict(stage)
        if "foreach" in stage:
            items = stage["foreach"]
            items = {k: v for k, v in items.items() if k in keep} if isinstance(items, dict) else [
                i for i in items if i in keep]
            if not items:
                continue
            stage["foreach"] = items
        else:
            for key in ("deps", "outs", "metrics"):
                if key in stage:
                    stage[key] = [e for e in stage[key] if not about_dropped(e)]
        stages[name] = stage
    spec["stages"] = stages
    spec["plots"] = [p for p in spec.get("plots", []) if not about_dropped(p)]
    return spec


def tiny_params(families: Iterable[str]) -> dict:
    """``tiny_pipeline_params`` with only ``families``."""
    params = tiny_pipeline_params()
    params["families"] = {k: v for k, v in params["families"].items() if k in set(families)}
    return params


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first, no outside Prefect/DVC settings, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DVC_", "GENAI_"))}
    env.update({
        "PATH": os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")]),
        "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    })
    env.update(extra)
    return env


def make_repo(root: Path, families: Iterable[str] = ("vae",), params: dict | None = None,
              stages: Iterable[str] | None = None) -> Path:
    """A committed git + DVC repository at ``root`` with the code, tiny params and a dvc.yaml cut down
    to ``families`` (the project's own when they are all of them).

    ``stages``: keep only these stages of the cut-down dvc.yaml (default: all).
    """
    families = list(families)
    root.mkdir(parents=True, exist_ok=True)
    for item in CODE:
        source = REPO_ROOT / item
        if source.is_dir():
            shutil.copytree(source, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / item)
    if set(families) != set(FAMILIES) or stages is not None:  # else the project's dvc.yaml as it is
        spec = dvc_yaml_for(families)
        if stages is not None:
            spec["stages"] = {name: stage for name, stage in spec["stages"].items() if name in set(stages)}
            spec.pop("plots", None)
        (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(families), sort_keys=False))
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/.prefect/\n")
    env = clean_env(root)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny pipeline"], root, env)
    return root


def run(args: list[str], cwd: Path, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; with ``check``, fail the test showing its output tails."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAKE_FAMILIES = ("vae", "dcgan", "transformer_lm")
FAKE_STAGE = '''"""A stand-in for prepare, features, train and evaluate (tests only): tests/fake_run.py's results.

The vae's FID is 45 [42, 48] when it trains fewer than 10 steps, else 30 [28, 32], so a params change
(e.g. -S families.vae.train.steps=2) moves a metric beyond its interval.
"""
import copy
import sys

sys.path.insert(1, {root!r})  # the checkout's tests package; this copy's own code (sys.path[0]) comes first
from tasks.config import load_params  # noqa: E402
from tests import fake_run  # noqa: E402

steps = load_params("params.yaml").families["vae"].train.steps
metrics = copy.deepcopy(fake_run.IMAGE_METRICS)
if steps < 10:
    metrics["vae"]["fid"].update(value=45.0, low=42.0, high=48.0)
fake_run.make_fake_run(metrics)
print(f"fake results written (vae trained {{steps}} steps: FID {{metrics['vae']['fid']['value']}})")
'''


def make_results_repo(root: Path) -> Path:
    """A committed git + DVC repository whose pipeline is two stages: ``results`` (tests/fake_run.py's
    results, from ``FAKE_STAGE``, in seconds) and the project's real ``report`` stage."""
    from tests.fake_run import fake_params

    make_repo(root, FAKE_FAMILIES, fake_params())
    outs = ["data/images", "data/text", "models/feature_extractor",
            *(f"{kind}/{family}" for kind in ("models", "evaluation") for family in FAKE_FAMILIES)]
    metrics = [f"metrics/{family}.json" for family in FAKE_FAMILIES]
    spec = {"stages": {
        "results": {"cmd": "python make_results.py", "deps": ["make_results.py"], "params": ["families.vae.train"],
                    "outs": outs, "metrics": [{m: {"cache": False}} for m in metrics]},
        "report": {"cmd": "python -m flows.cli report", "deps": ["tasks/report.py", *outs, *metrics],
                   "params": ["report"],
                   "outs": ["reports/report.html", "reports/metrics.csv", "reports/summary.json"]},
    }}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "make_results.py").write_text(FAKE_STAGE.format(root=str(REPO_ROOT)))
    env = clean_env(root)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "a two-stage pipeline of fake results and the real report"], root, env)
    return root
