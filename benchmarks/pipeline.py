"""Items 3 and 4: orchestration overhead, no-op runs, and each step's peak memory.

The pipeline runs in a throw-away git + DVC copy of the repository (``tests/pipeline_repo.py``),
never in the working checkout: with ``--quick`` on the end-to-end test's tiny params, otherwise
on the project's own ``params.yaml`` (the default run, ~15-20 min on a laptop CPU).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import Figure, timed
from flows.pipeline import LAST_RUN
from tests.pipeline_repo import clean_env, make_repo, run, tiny_params

ITEM_OVERHEAD, ITEM_NOOP, ITEM_RSS = "3. orchestration", "3. no-op", "4. peak RSS"
REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_records(root: Path) -> dict[str, dict]:
    """Stage name -> what the step wrote about itself (wall_s, peak_rss_mb), from summary/provenance files."""
    records = {}
    for path in sorted(root.glob("models/*/summary.json")) + sorted(root.glob("evaluation/*/provenance.json")):
        data = json.loads(path.read_text())
        if "wall_s" in data:
            records[data.get("step", str(path.parent.relative_to(root)))] = data
    return records


def pipeline_figures(quick: bool, keep: bool = False) -> list[Figure]:
    """Run the flow once from scratch, then time no-op `dvc repro` and no-op flow runs in the same copy."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    families = list(params["families"])
    if quick:
        params = tiny_params(families)
    label = "tiny params (tests/test_end_to_end.py), --quick" if quick else "the default params.yaml"
    root = Path(tempfile.mkdtemp(prefix="genai-bench-")) / "repo"
    try:
        make_repo(root, families, params)
        env = clean_env(root)
        env.pop("OMP_NUM_THREADS", None)  # stages use every core, as in a normal run
        flow = [sys.executable, "-m", "flows.pipeline"]
        flow_s, _ = timed(lambda: run(flow, root, env, timeout=3600))
        records = stage_records(root)
        last_run = json.loads((root / LAST_RUN).read_text())
        # prepare_* and report record no wall_s of their own: their subprocess wall counts as compute.
        unrecorded = [r for r in last_run["ran"] if r["name"].startswith("prepare_") or r["name"] == "report"]
        compute = sum(r["wall_s"] for r in records.values()) + sum(r["wall_s"] for r in unrecorded)
        subprocess_wall = sum(r["wall_s"] for r in last_run["ran"])
        overhead = flow_s - compute
        figures = [
            Figure(ITEM_OVERHEAD, "flow wall", "s", flow_s, flow_s, flow_s, 1, how=f"one from-scratch "
                   f"`python -m flows.pipeline` on {label}; {len(last_run['ran'])} stages ran"),
            Figure(ITEM_OVERHEAD, "compute (steps' own wall_s)", "s", compute, compute, compute, 1,
                   how=f"sum of wall_s in {len(records)} summary.json/provenance.json files "
                       f"({', '.join(records)}) + the subprocess wall of {', '.join(r['name'] for r in unrecorded)} "
                       "(they write no wall_s); "
                       f"the stage subprocesses' wall as the flow saw it (with interpreter start and imports): "
                       f"{subprocess_wall:.1f} s"),
            Figure(ITEM_OVERHEAD, "Prefect/DVC overhead share", "%", 100 * overhead / flow_s,
                   100 * overhead / flow_s, 100 * overhead / flow_s, 1, "<= 10% (default run)",
                   ("pass" if overhead / flow_s <= 0.10 else "FAIL") if not quick else "info",
                   f"(flow wall - compute) / flow wall = {overhead:.1f} s / {flow_s:.1f} s; of it "
                   f"{flow_s - subprocess_wall:.1f} s outside the stage processes (Prefect server start, DVC "
                   f"status/commit), {subprocess_wall - compute:.1f} s inside them before/after the steps' "
                   "clocks (interpreter start, imports, params validation)"
                   + ("; on the tiny --quick config compute is tiny, so the target is not judged" if quick else "")),
        ]
        dvc_s = [timed(lambda: run(["dvc", "repro"], root, env))[0] for _ in range(3)]
        repro_out = run(["dvc", "repro"], root, env).stdout
        assert "Running stage" not in repro_out, f"dvc repro after the flow was not a no-op:\n{repro_out}"
        noop_s = []
        for _ in range(2 if quick else 3):
            seconds, result = timed(lambda: run(flow, root, env))
            assert "nothing changed" in result.stdout + result.stderr, "a flow run after the flow did work"
            noop_s.append(seconds)
        figures += [
            Figure.from_values(ITEM_NOOP, "dvc repro, nothing changed", "s", dvc_s,
                               f"`dvc repro` in the same copy after the flow run ({label}); asserted no stage ran",
                               target=lambda s: s <= 3, target_text="<= 3 s"),
            Figure.from_values(ITEM_NOOP, "flow, nothing changed", "s", noop_s,
                               "`python -m flows.pipeline` again (temporary local Prefect server each run); "
                               "asserted 'nothing changed'", target=lambda s: s <= 30, target_text="<= 30 s"),
        ]
        for step, record in records.items():
            rss = record.get("peak_rss_mb")
            if rss is None:
                continue
            figures.append(Figure(ITEM_RSS, step, "MiB", rss, rss, rss, 1, "<= 4096 MiB",
                                  "pass" if rss <= 4096 else "FAIL",
                                  f"peak_rss_mb (getrusage RUSAGE_SELF ru_maxrss of the step's own process) "
                                  f"from its summary/provenance.json; {label}"))
        return figures
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root.parent, ignore_errors=True)
