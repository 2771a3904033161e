"""Sample quality per family at its default budget and at multiples of it.

    .venv/bin/python -m benchmarks.quality [--families vae ddpm ...] [--steps-scale 1 2 4]
        [--set families.ddpm.train.steps=2000 ...] [--curve 300] [--samples 1000] [--tag NAME]

For every family and every steps scale it trains the family with the real step code
(``tasks.train.train_family``, the function ``python -m flows.cli train`` runs) on the
repository's ``params.yaml`` (``train.steps`` multiplied by the scale; ``--set`` overrides any
key) in a scratch workspace under ``build/quality/``, draws ``--samples`` images with the
evaluation's seed and batch size, and prints:

- ``score``: the Inception-style score exp E[KL(p(y|x) || p(y))] of the feature classifier's
  softmax (``models/feature_extractor``; maximum = number of classes, 10);
- ``precision``, ``recall``, ``density``, ``coverage`` (k = ``evaluate.k_nearest``) and ``fid`` in
  the classifier's feature space against the test images;
  all measured by the evaluation step's own ``tasks.evaluate.ImageJudge`` on *plain* draws
  (``GenerativeModel.plain_sampling``), the comparable numbers;
- ``conf_*``: the same for the family's configured sampling where that is not plain (e.g. VAE
  decoder means), what its sample grid shows;
- ``bpd``: test NLL in bits/dim, exact or the tightest bound the family reports;
- ``train_s`` (the training steps' own seconds, ``summary.json``), ``train_cpu_s`` (CPU
  seconds of the whole train step, all threads), ``sample_s`` (wall seconds to draw and measure the plain samples).

Data and the feature classifier are prepared once per workspace (``build/quality/shared``) with
the real ``prepare`` and ``features`` steps. Results are appended to
``build/quality/results.jsonl``; ``--record`` also writes ``benchmarks/results/quality.md``.
Timings depend on the machine's load: the table says how many CPUs and what load there was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from benchmarks.common import RESULTS_DIR
from tasks.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = REPO / "build" / "quality"
COLUMNS = ("score", "precision", "recall", "density", "coverage", "fid", "conf_score", "conf_coverage",
           "conf_fid", "bpd", "train_s", "train_cpu_s", "sample_s")


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def set_key(params: dict, dotted: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw params mapping."""
    key, _, value = dotted.partition("=")
    if not _:
        raise SystemExit(f"--set expects key=value, got {dotted!r}")
    node, parts = params, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)


def run_params(base: dict, family: str, scale: float, overrides: list[str]) -> dict:
    """``base`` reduced to ``family`` with its steps multiplied by ``scale`` and ``overrides`` applied."""
    params = json.loads(json.dumps(base))
    params["families"] = {family: params["families"][family]}
    train = params["families"][family]["train"]
    train["steps"] = max(1, round(train["steps"] * scale))
    for item in overrides:
        if item.startswith(f"families.{family}.") or not item.startswith("families."):
            set_key(params, item)
    return params


def prepare_shared(base: dict) -> Path:
    """Prepared images and the feature classifier, made once by the real steps."""
    from flows.cli import run

    shared = WORKSPACE / "shared-v2"  # v2: the features step's output since issue 10
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    with working_directory(shared):
        if not Path("data/images/manifest.json").exists():
            run(["prepare", "image"])
        if not Path("models/feature_extractor/summary.json").exists():
            run(["features"])
    return shared


def judge_for(shared: Path, config: Any):
    """The evaluation step's ``ImageJudge`` on the shared feature network and real reference."""
    from tasks.evaluate import ImageJudge

    with working_directory(shared):
        return ImageJudge(config, torch.device("cpu"))


def sample_metrics(judge: Any, model: Any, count: int, seed: int) -> dict[str, float]:
    """The evaluation's sample metrics of ``count`` draws (no intervals); ``score`` is the Inception-style one."""
    values = judge.sample_metrics(model, count, seed, replicates=0, what=type(model).__name__).values
    return {"score": values["inception_score"], **{k: v for k, v in values.items() if k != "inception_score"}}


def headline_bits_per_dim(model, config: Any) -> tuple[float | None, dict[str, float]]:
    """Test bits/dim: exact, else the tightest bound the family reports (the report's headline)."""
    from tasks.evaluate import image_nll

    if not model.has_likelihood:
        return None, {}
    values = image_nll(model, config, model.device).values
    return values["nll_bits_per_dim"], {k: v for k, v in values.items() if k.startswith("bits_per_dim")}


def measure(family: str, scale: float, params: dict, shared: Path, judge: Any, samples: int,
            tag: str, nll: bool = True) -> dict[str, Any]:
    """Train ``family`` with ``params`` in its own folder, then measure its samples and NLL."""
    from tasks.checkpoints import load_model
    from tasks.config import parse_params
    from tasks.train import train_family

    name = f"{family}-x{scale:g}" + (f"-{tag}" if tag else "")
    folder = WORKSPACE / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for link in ("data", "models/feature_extractor"):
        target = folder / link
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(shared / link, target_is_directory=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = parse_params(params)
    with working_directory(folder):
        cpu_start = time.process_time()
        out = train_family(config, family)
        train_cpu = time.process_time() - cpu_start
        summary = json.loads((out / "summary.json").read_text())
        model = load_model(out / "model.pt")
        seed, plain = config.sample_seed, model.plain_sampling()
        start = time.perf_counter()
        row: dict[str, Any] = {"family": family, "scale": scale, "tag": tag, "steps": summary["steps"],
                               **sample_metrics(judge, plain or model, samples, seed)}
        sample_seconds = time.perf_counter() - start  # drawing and measuring
        if plain is not None:
            row.update({f"conf_{k}": v for k, v in sample_metrics(judge, model, samples, seed).items()})
        start = time.perf_counter()
        row["bpd"], row["bits"] = headline_bits_per_dim(model, config) if nll else (None, {})
        row.update(train_s=summary["train_seconds"], train_cpu_s=round(train_cpu, 1),
                   sample_s=round(sample_seconds, 1), nll_s=round(time.perf_counter() - start, 1),
                   sampling=model.describe_sampling(), train=params["families"][family]["train"],
                   model=params["families"][family]["model"], load=os.getloadavg()[0], samples=samples)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| run | steps | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.get(column)
            cells.append("" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value))
        run = f"{row['family']} x{row['scale']:g}" + (f" {row['tag']}" if row["tag"] else "")
        lines.append(f"| {run} | {row['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", help="image families to run (default: every image family)")
    parser.add_argument("--steps-scale", nargs="+", type=float, default=[1.0], help="multiples of train.steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (YAML value), e.g. families.ddpm.train.steps=2000")
    parser.add_argument("--samples", type=int, default=1000, help="images drawn per run (default 1000)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--tag", default="", help="name suffix of the runs (kept apart from untagged ones)")
    parser.add_argument("--record", action="store_true", help="also write benchmarks/results/quality.md")
    parser.add_argument("--no-nll", action="store_true", help="skip the test NLL (quicker probes)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tasks.config import parse_params

    if args.threads:
        torch.set_num_threads(args.threads)
    base = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        if not item.startswith("families."):
            set_key(base, item)
    config = parse_params(base)
    families = args.families or config.image_families()
    unknown = sorted(set(families) - set(config.image_families()))
    if unknown:
        raise SystemExit(f"not image families of {args.params}: {', '.join(unknown)}")
    shared = prepare_shared(base)
    judge = judge_for(shared, config)
    rows = []
    for family in families:
        for scale in args.steps_scale:
            row = measure(family, scale, run_params(base, family, scale, args.set), shared, judge,
                          args.samples, args.tag, nll=not args.no_nll)
            rows.append(row)
            with open(WORKSPACE / "results.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(format_table([row]).splitlines()[-1], flush=True)
    table = format_table(rows)
    how = (f"{args.samples} plain samples per run (conf_: the configured sampling) vs "
           f"{judge.reference.test.shape[0]} test images; feature classifier of "
           f"{shared / 'models/feature_extractor'}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
           f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\n" + table + "\n\n" + how)
    if args.record:
        atomic_write_text(RESULTS_DIR / "quality.md", f"# python -m benchmarks.quality {' '.join(sys.argv[1:] if argv is None else argv)}\n\n"
                          f"{table}\n\n{how}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
