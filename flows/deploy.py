"""Scheduled retraining: the pipeline as a Prefect deployment, served on a schedule.

    python -m flows.deploy                       # cron from params.yaml `orchestration.schedule`
    python -m flows.deploy --cron '0 3 * * *'    # another cron (UTC)
    python -m flows.deploy --interval 3600       # every hour instead

Needs a running Prefect server (PREFECT_API_URL; see the README). Each scheduled run:

1. ``dvc pull``: bring the workspace to the versions in dvc.lock from the remote; files
   the remote does not have yet (an empty remote, a first run) are skipped, and the
   stages that make them run in step 2;
2. the pipeline flow as a subflow: only stages whose inputs changed run (DVC tracks the
   data checksums, each family's params block and its code); the ``report`` stage
   re-renders the report whenever anything it shows changed;
3. ``dvc push``: the new outputs go to the remote; and ``dvc exp push``: the run's record (a DVC
   experiment, see flows/record.py) goes to the git remote named by DVC's ``exp.git_remote``
   setting, else ``origin`` (a checkout without one keeps its records locally and says so).

With nothing changed a run takes seconds and logs "nothing changed". A run whose report flags a
regression ends Failed when ``report.fail_on_regression`` is set, after pushing its outputs.

Overlapping runs: the deployment's concurrency limit is 1 with the CANCEL_NEW collision
strategy, so a run that comes due while one is running is cancelled (not queued: a queue
would grow whenever a run outlasts the interval). The checkout's run lock
(flows/run_lock.py) also keeps manual ``python -m flows.pipeline`` runs out of a
scheduled run's way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.pipeline import RegressionFlagged, check_inputs, make_task_runner, pipeline  # sets Prefect defaults first
from flows.run_lock import dvc_lock, run_lock
from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from tasks.config import OrchestrationConfig, ParamsError
from tasks.datasets import DataError

DEPLOYMENT = "scheduled-retraining"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


@task(retries=2, retry_delay_seconds=[10, 60])  # the remote is over the network: a retry can help
def pull_outputs(root: Path) -> dict:
    """``dvc pull``, skipping what the remote does not have; returns DVC's counts."""
    from dvc.repo import Repo

    logger = get_run_logger()
    if not (root / "dvc.lock").exists():
        logger.info("dvc pull: no dvc.lock yet (a first run), nothing to pull")
        return {}
    with dvc_lock(root), Repo(str(root)) as repo:
        stats = repo.pull(allow_missing=True)["stats"]
    logger.info("dvc pull: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))
    return stats


@task(retries=2, retry_delay_seconds=[10, 60])
def push_outputs(root: Path) -> int:
    """``dvc push`` of every output in dvc.lock; returns how many files were uploaded."""
    from dvc.repo import Repo

    logger = get_run_logger()
    with dvc_lock(root), Repo(str(root)) as repo:
        pushed = repo.push()
        remote = repo.config["core"].get("remote", "default")
    logger.info("dvc push: %d file(s) uploaded to remote %r", pushed, remote)
    return pushed


@task(retries=2, retry_delay_seconds=[10, 60])
def push_run_record(root: Path, run_name: str | None) -> str | None:
    """``dvc exp push`` of the run's record to the git remote (DVC's ``exp.git_remote``, else ``origin``)."""
    import subprocess

    from dvc.repo import Repo

    logger = get_run_logger()
    if not run_name:
        return None
    with dvc_lock(root), Repo(str(root)) as repo:
        remote = repo.config.get("exp", {}).get("git_remote") or "origin"
        known = subprocess.run(["git", "remote"], cwd=root, capture_output=True, text=True).stdout.split()
        if remote not in known:
            logger.warning("run record %s stays in this checkout: no git remote %r (git remote add origin URL, "
                           "or dvc config exp.git_remote NAME)", run_name, remote)
            return None
        # The outputs went with dvc push. Pushing them again from the experiment's revision would resolve
        # a relative remote url (the default ../dvc-storage) from / in DVC 3.67, outside the checkout.
        repo.experiments.push(remote, [run_name], push_cache=False)
    logger.info("dvc exp push: run record %s pushed to git remote %r", run_name, remote)
    return remote


@flow(name="genai-retraining")
def scheduled_retraining(repo_root: str = ".", params_file: str = "params.yaml",
                         overrides: list[str] | None = None) -> dict:
    """Pull, bring every stage up to date (pipeline flow), push; returns what ran and the report's path."""
    logger = get_run_logger()
    root = Path(repo_root).resolve()
    config = check_inputs(root, params_file, overrides or [])
    with run_lock(root, flow_run.id):
        pulled = pull_outputs(root)
        runner = make_task_runner(config.orchestration)
        try:
            result = pipeline.with_options(task_runner=runner)(str(root), params_file, False, overrides)
        except RegressionFlagged as flagged:  # the outputs and the record still go to the remotes
            push_outputs(root)
            push_run_record(root, flagged.result.get("run_record"))
            raise
        pushed = push_outputs(root)
        push_run_record(root, result.get("run_record"))
    if not result["ran"]:
        logger.info("nothing changed: every stage was up to date; report %s", result["report"])
    else:
        logger.info("retrained: %s; report %s", ", ".join(r["name"] for r in result["ran"]), result["report"])
    return {**result, "pulled": pulled, "pushed": pushed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root holding dvc.yaml and params.yaml")
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="each run uses FILE in place of params.yaml (as python -m flows.pipeline --params)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param in every run, as `dvc exp run -S` does (repeatable)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron expression in UTC (default: params.yaml orchestration.schedule)")
    when.add_argument("--interval", type=float, help="run every INTERVAL seconds instead of a cron schedule")
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default: {DEPLOYMENT})")
    args = parser.parse_args(argv)
    if args.interval is not None and args.interval <= 0:
        parser.error(f"--interval must be a positive number of seconds, got {args.interval}")
    root = Path(args.repo).resolve()
    try:
        config = check_inputs(root, args.params, args.overrides)
        if args.cron:  # validated like params.yaml's own schedule
            OrchestrationConfig.model_validate({**config.orchestration.model_dump(), "schedule": args.cron})
    except (ParamsError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        print("error: no Prefect server configured. Start one (`prefect server start`) and point at it: "
              "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`", file=sys.stderr)
        return 2
    schedule = {"interval": args.interval} if args.interval else {"cron": args.cron or config.orchestration.schedule}
    os.chdir(root)  # the runner starts each flow run in this folder and imports flows.deploy from it
    try:
        scheduled_retraining.serve(
            name=args.name, **schedule, global_limit=ONE_AT_A_TIME,
            parameters={"repo_root": str(root), "params_file": args.params, "overrides": args.overrides},
            description="Scheduled retraining: dvc pull, the pipeline flow (changed stages only), dvc push.",
        )
    finally:
        pause(f"{scheduled_retraining.name}/{args.name}")
    return 0


def pause(deployment: str) -> None:
    """Pause the deployment's schedule once nothing serves it, so no runs pile up unserved.

    Prefect pauses it on Ctrl-C, but its SIGTERM handler (3.8) exits before doing so.
    """
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            client.pause_deployment(client.read_deployment_by_name(deployment).id)
    except Exception as err:  # the server may be gone too; the schedule then stays as it was
        print(f"could not pause {deployment}: {err}", file=sys.stderr)
    else:
        print(f"paused the schedule of {deployment}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
