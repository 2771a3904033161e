"""``genai-pipeline``: the console script (pyproject ``[project.scripts]``), one name for every entry
point: the flow (flows/pipeline.py), the scheduled deployment (flows/deploy.py), each stage's step
(flows/cli.py, what dvc.yaml runs) and the run history (tasks/history.py)."""

from __future__ import annotations

import argparse
import sys

STEPS = ("prepare", "features", "train", "evaluate", "report", "check")
USAGE = """usage: genai-pipeline COMMAND [ARGS]

  genai-pipeline run [-S KEY=VALUE ...] [--force] [--params FILE]   the Prefect flow (python -m flows.pipeline)
  genai-pipeline serve [--cron CRON | --interval SECONDS]            scheduled retraining (python -m flows.deploy)
  genai-pipeline prepare image|text                                  one step, as dvc.yaml runs it
  genai-pipeline features                                            (python -m flows.cli ...)
  genai-pipeline train FAMILY
  genai-pipeline evaluate FAMILY
  genai-pipeline report
  genai-pipeline check                                               validate params.yaml
  genai-pipeline history [-n N]                                      the recorded runs, newest first

genai-pipeline COMMAND --help describes each one."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from flows.pipeline import main as run

        return run(rest)
    if command == "serve":
        from flows.deploy import main as serve

        return serve(rest)
    if command == "history":
        return history(rest)
    if command in STEPS:
        from flows.cli import main as step

        return step(argv)
    print(f"genai-pipeline: unknown command {command!r}; one of: run, serve, {', '.join(STEPS)}, history",
          file=sys.stderr)
    return 2


def history(argv: list[str]) -> int:
    """Print the recorded runs (DVC experiments on this branch's commits) with their headline metrics,
    each against the run before it (regressions flagged as in the report)."""
    from genai_models.metrics.catalogue import CATALOGUE
    from tasks import history as runs
    from tasks.config import ParamsError, load_params

    parser = argparse.ArgumentParser(prog="genai-pipeline history", description=history.__doc__)
    parser.add_argument("-n", type=int, default=10, help="how many runs (default 10)")
    parser.add_argument("--params", default="params.yaml", help="names the families and the regression tolerance")
    args = parser.parse_args(argv)
    try:
        config = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = runs.read_history(list(config.families), args.n + 1)
    if not records:
        print("no recorded runs on this branch's commits (on a fresh clone: dvc exp pull --no-cache -A origin)")
        return 0
    for record, before in zip(records[:args.n], records[1:] + [None]):
        data = ", ".join(f"{path} {md5[:8]}" for path, md5 in sorted(record.data.items()))
        print(f"{record.name}  {record.when}  commit {record.baseline[:10]}  params {record.params_sha256[:10]}"
              f"  {data}")
        changes = {(c.family, c.metric.key): c for c in runs.compare_metrics(
            before.metrics if before else {}, record.metrics, config.report.regression_tolerance)}
        for family, metrics in record.metrics.items():
            cells = []
            for key in (k for k in metrics if CATALOGUE[k].verdict):
                change = changes[(family, key)]
                flag = " REGRESSION" if change.regression else ""
                delta = f" ({change.delta:+.3g}{flag})" if change.delta else ""
                cells.append(f"{CATALOGUE[key].label} {metrics[key].value:.4g}{delta}")
            print(f"    {family}: {'; '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
