"""Are the report's intervals honest? ``python -m benchmarks.calibration [--seeds 1 2 3] [--families ...]``

Evaluates the trained models of the current workspace (``models/``, as a pipeline run left them)
with several sample seeds, exactly as the evaluate step does (same sample count, bootstrap,
feature space), and checks every sample-based (family, metric) pair: does each seed's 95% interval
contain the other seeds' estimates? The intervals promise where a fresh draw of samples lands,
so at least 90% of pairs should hold.

Writes ``benchmarks/results/calibration.json`` and ``calibration.md`` and prints the table.
Nothing in the workspace is written.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import sys
import time

from benchmarks.common import RESULTS_DIR, command_line, machine_info
from tasks.config import load_params
from tasks.io import atomic_write_text, to_json_text
from tasks.runtime import resolve_device, setup_logging

log = logging.getLogger("benchmarks.calibration")


def evaluate_with_seed(config, family: str, sample_seed: int, judge) -> dict:
    """{metric: (estimate, low, high)} of the headline model with samples drawn from ``sample_seed``."""
    from tasks.checkpoints import load_model
    from tasks.evaluate import evaluate_image_model, evaluate_text_model, metric_values
    from tasks.samples import seed_model_dir

    seeded = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"sample_seed": sample_seed})})
    device = resolve_device(config.device)
    model = load_model(seed_model_dir(family, config.training_seeds[0], config.training_seeds) / "model.pt", device)
    if model.modality == "image":
        measured, _ = evaluate_image_model(model, seeded, judge, replicates=config.evaluate.bootstrap,
                                           what=f"{family} (sample seed {sample_seed})")
    else:
        measured, _ = evaluate_text_model(model, seeded, device, replicates=config.evaluate.bootstrap)
    values = metric_values(measured, {}, {}, [])
    return {name: (v.value, v.low, v.high) for name, v in values.items() if v.low is not None}


def calibration_rows(results: dict[str, dict[int, dict]]) -> list[dict]:
    """Per (family, metric): the estimates and intervals of every seed, and how many cross-checks hold."""
    rows = []
    for family, by_seed in results.items():
        seeds = list(by_seed)
        for metric in by_seed[seeds[0]]:
            checks = [by_seed[a][metric][1] <= by_seed[b][metric][0] <= by_seed[a][metric][2]
                      for a, b in itertools.permutations(seeds, 2)]
            rows.append({"family": family, "metric": metric, "held": sum(checks), "checks": len(checks),
                         "estimates": {s: by_seed[s][metric] for s in seeds}})
    return rows


def markdown(rows: list[dict], seeds: list[int], meta: dict) -> str:
    pairs = sum(r["held"] == r["checks"] for r in rows)
    checks, held = sum(r["checks"] for r in rows), sum(r["held"] for r in rows)
    lines = [
        "# Interval calibration", "",
        f"Command: `{meta['command']}`; {meta['started']} to {meta['finished']}; machine: {meta['machine'].get('cpu')}.",
        f"Sample seeds {seeds}; each seed's 95% interval checked against every other seed's estimate.", "",
        f"**(family, metric) pairs whose intervals contain every other draw's estimate: {pairs} / {len(rows)} "
        f"({100 * pairs / max(len(rows), 1):.0f}%)**; single cross-checks that hold: {held} / {checks} "
        f"({100 * held / max(checks, 1):.0f}%).", "",
        "| family | metric | " + " | ".join(f"seed {s}: estimate [interval]" for s in seeds) + " | holds |",
        "|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for r in rows:
        cells = [f"{v:.4g} [{lo:.4g}, {hi:.4g}]" for v, lo, hi in (r["estimates"][s] for s in seeds)]
        lines.append(f"| {r['family']} | {r['metric']} | " + " | ".join(cells) + f" | {r['held']}/{r['checks']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="sample seeds (default 1 2 3)")
    parser.add_argument("--families", nargs="+", help="default: every family in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    config = load_params(args.params)
    families = args.families or list(config.families)
    meta = {"command": command_line("benchmarks.calibration"), "machine": machine_info(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    judge = None
    if set(families) & set(config.image_families()):
        from tasks.evaluate import ImageJudge

        judge = ImageJudge(config, resolve_device(config.device))
    results: dict[str, dict[int, dict]] = {}
    for family in families:
        results[family] = {}
        for seed in args.seeds:
            start = time.perf_counter()
            results[family][seed] = evaluate_with_seed(config, family, seed, judge)
            print(f"{family}: sample seed {seed} done in {time.perf_counter() - start:.0f} s", flush=True)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    rows = calibration_rows(results)
    table = markdown(rows, args.seeds, meta)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS_DIR / "calibration.json", to_json_text({"meta": meta, "rows": json.loads(
        json.dumps(rows))}))
    atomic_write_text(RESULTS_DIR / "calibration.md", table)
    print(table)
    pairs = sum(r["held"] == r["checks"] for r in rows)
    return 0 if pairs >= 0.9 * len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
