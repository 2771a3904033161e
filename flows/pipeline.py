"""The Prefect flow that runs the whole pipeline: prepare -> features/train -> evaluate -> report.

The steps and their inputs are declared once, in ``dvc.yaml``. This flow reads that
graph from DVC and, for every stage in dependency order, asks DVC whether the stage is
out of date (its deps, params or outs changed), runs the stage's own command if so, and
records the result in ``dvc.lock`` (``dvc commit``). So a flow run and ``dvc repro``
do the same work, skip the same things, and a ``dvc repro`` after a flow run is a no-op.

What Prefect adds: runs on a schedule (see flows/deploy.py), retries (a stage whose process
was killed, e.g. by the OOM killer, runs once more and resumes; a stage that failed by itself
does not, since it would fail the same way), concurrency of independent stages (threads, or a
Dask cluster: params.yaml ``orchestration``) with one stage per GPU (flows/gpus.py), a UI with
every stage's logs, and three artifacts per run: the metrics table, the verdict with any
regressions, and a link to the report (flows/record.py). One run per checkout at a time; a run
whose process was killed is marked Crashed by the next one (flows/run_lock.py).

Every finished run is recorded as a DVC experiment (``dvc exp show``), and the report compares
it with the previous one (tasks/history.py). With ``report.fail_on_regression`` a run whose
report flags a regression ends Failed.

    python -m flows.pipeline                            # run (starts a temporary Prefect server if none is configured)
    python -m flows.pipeline --force                    # re-run every stage
    python -m flows.pipeline -S families.vae.train.steps=100   # override params for this run (dvc exp run -S syntax)
    python -m flows.pipeline --params other.yaml        # run with other.yaml in place of params.yaml
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.futures import wait  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows import record  # noqa: E402
from flows.gpus import POOLS, GpuPlan, GpuPool, dask_cluster_kwargs, plan_stages, stage_gpus, visible_gpus  # noqa: E402
from flows.overrides import load_run_params, params_in_place, restore_left_behind, run_params  # noqa: E402
from flows.run_lock import FLOW_RUN_ENV, PipelineBusy, dvc_lock, reserve, run_lock  # noqa: E402
from flows.watchdog import stop_children_with_this_process  # noqa: E402
from tasks.config import OrchestrationConfig, ParamsError, PipelineConfig  # noqa: E402
from tasks.datasets import DataError, check_sources  # noqa: E402
from tasks.io import atomic_write_json  # noqa: E402

LAST_RUN = Path(".runs/pipeline-last-run.json")  # what the last finished run did (stages, times, workers)
PARENT_PID = "GENAI_PIPELINE_PARENT_PID"  # a stage process exits when this process is gone (flows/cli.py)


@dataclass
class StageRun:
    name: str
    ran: bool
    wall_s: float = 0.0
    reason: str = ""
    started: float = 0.0   # epoch seconds
    finished: float = 0.0
    worker: str = ""       # host:pid of the process that ran the stage's command
    cuda_visible_devices: str | None = None  # the GPUs it was given ("" none; None: not pinned)


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; ``killed`` when a signal ended it (SIGKILL: OOM killer, preemption)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode

    @property
    def killed(self) -> bool:
        # A shell passes on the signal's death (-9), or reports it as 128 + 9 when the shell itself stayed.
        return self.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


class RegressionFlagged(RuntimeError):
    """The run's report flagged regressions and ``report.fail_on_regression`` is set."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


def retry_if_killed(task, task_run, state) -> bool:
    """Prefect retry condition: retry a stage only when its process was killed (it resumes where it was).

    A stage that exits with an error by itself (bad input, diverged training, a bug) would fail the
    same way again, so it is not retried.
    """
    error = state.data if isinstance(state.data, BaseException) else None
    return isinstance(error, StageFailed) and error.killed


def stage_order(repo_root: Path) -> list[tuple[str, str, list[str]]]:
    """(name, command, upstream stage names) for every stage, in dependency order."""
    import networkx as nx
    from dvc.repo import Repo

    with dvc_lock(repo_root), Repo(str(repo_root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = [stage for generation in nx.topological_generations(graph.reverse()) for stage in generation]
        return [(s.addressing, s.cmd, [u.addressing for u in graph.successors(s)]) for s in order]


def stage_changes(repo_root: Path, name: str) -> list:
    """What DVC says changed for the stage; empty when it is up to date."""
    from dvc.repo import Repo

    with dvc_lock(repo_root), Repo(str(repo_root)) as repo:
        return repo.status(targets=[name]).get(name, [])


def commit_stage(repo_root: Path, name: str) -> None:
    """Record the stage's deps and outs in dvc.lock and its outs in the DVC cache."""
    from dvc.repo import Repo

    with dvc_lock(repo_root), Repo(str(repo_root)) as repo:
        repo.commit(name, force=True)


def _stage_environment(parallel: int, flow_run_id: str, cuda_visible_devices: str | None = None) -> dict[str, str]:
    """The stage process's environment: this interpreter first on PATH, threads shared between parallel
    stages, the flow run whose lock it runs under, its GPUs (``cuda_visible_devices``; None leaves
    the variable as it is)."""
    env = dict(os.environ)
    # `python` in a stage command is this interpreter (the project's virtual environment).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    env[PARENT_PID] = str(os.getpid())
    env[FLOW_RUN_ENV] = flow_run_id  # the stage command runs inside this run's lock (flows/run_lock.py)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


@task(task_run_name="{name}", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_killed)
def reproduce_stage(repo_root: Path, name: str, command: str, force: bool, parallel: int,
                    gpu_plan: GpuPlan = GpuPlan()) -> StageRun:
    """Bring one DVC stage up to date: run its command if DVC says it changed, then commit it.

    The command runs on the GPUs ``gpu_plan`` hands it (waiting for them if they are taken).
    """
    logger = get_run_logger()
    changes = ["forced"] if force else stage_changes(repo_root, name)
    if not changes:
        logger.info("%s is up to date: skipped", name)
        return StageRun(name, ran=False)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with stage_gpus(gpu_plan) as cuda_visible_devices:
        gpus = "" if cuda_visible_devices is None else f", CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}"
        logger.info("%s: running `%s` on %s%s (%s)", name, command, worker, gpus, _describe(changes))
        started, start = time.time(), time.perf_counter()
        process = subprocess.Popen(command, shell=True, cwd=repo_root,
                                   env=_stage_environment(parallel, str(flow_run.id), cuda_visible_devices),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        for line in process.stdout:
            logger.info("%s | %s", name, line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
        if process.wait() != 0:
            how = (f"killed by signal {abs(process.returncode) if process.returncode < 0 else process.returncode - 128}"
                   if StageFailed("", process.returncode).killed else f"exit {process.returncode}")
            raise StageFailed(f"stage {name} failed ({how}):\n" + "\n".join(tail), process.returncode)
        wall = time.perf_counter() - start
    commit_stage(repo_root, name)
    logger.info("%s done in %.1f s", name, wall)
    return StageRun(name, ran=True, wall_s=round(wall, 2), reason=_describe(changes), started=started,
                    finished=started + wall, worker=worker, cuda_visible_devices=cuda_visible_devices)


def _describe(changes: list) -> str:
    parts = []
    for change in changes:
        if isinstance(change, dict):
            for kind, what in change.items():
                parts.append(f"{kind}: {', '.join(what) if isinstance(what, dict) else what}")
        else:
            parts.append(str(change))
    return "; ".join(parts)


def check_inputs(root: Path, params_file: str = "params.yaml", overrides: list[str] | tuple = ()) -> PipelineConfig:
    """Validate the run's params (``params_file`` with ``-S`` ``overrides``) and check the data they name
    is there: one clear error before any work.

    Raises ``ParamsError`` or ``DataError``.
    """
    config = load_run_params(root, run_params(root, params_file, overrides), params_file, overrides)
    check_sources(config.data.images, config.data.text, base=root, extractor=config.features.extractor)
    return config


@task(retries=1, retry_delay_seconds=5)
def record_run(root: Path, ran: list[str], message: str) -> tuple[str | None, str]:
    """Save the finished run as a DVC experiment: (its name or None, what happened)."""
    logger = get_run_logger()
    try:
        name, new = record.record_run(root, ran, message)
    except record.NotRecorded as err:
        logger.error("this run is not recorded: %s", err)
        return None, f"not recorded: {err}"
    what = f"recorded as DVC experiment {name}" if new else f"nothing changed since run {name}: not recorded again"
    logger.info("%s (dvc exp show)", what)
    return name, what


@task(retries=2, retry_delay_seconds=[2, 10])
def publish_artifacts(root: Path, config: PipelineConfig, run_name: str | None, ran: list[str], note: str) -> dict:
    """The metrics table, the verdict and the report link as Prefect artifacts; returns the report's summary."""
    return record.publish_artifacts(root, config, run_name, ran, note)


def make_task_runner(orchestration: OrchestrationConfig, gpus: list[str] | None = None):
    """Threads in this process, or a Dask cluster (local, or the scheduler at ``dask_address``).

    ``gpus``: the GPUs handed out (flows/gpus.py); the local Dask cluster then has one worker per GPU.
    """
    if orchestration.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=orchestration.max_parallel_stages)
    from prefect_dask import DaskTaskRunner

    if orchestration.dask_address:
        return DaskTaskRunner(address=orchestration.dask_address)
    start_temporary_server()  # the workers must reach the same API as this process
    # Single-threaded worker processes (one per parallel stage, or per GPU): each stage is a subprocess anyway.
    return DaskTaskRunner(cluster_kwargs=dask_cluster_kwargs(orchestration, gpus or []))


def start_temporary_server() -> None:
    """Without a configured Prefect server, start the temporary one now.

    It is the instance this process's own client uses (a singleton); its URL goes into the
    environment for Dask workers.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the worker processes


def _dask_resources(plan: GpuPlan) -> contextlib.AbstractContextManager:
    """Dask: the task of a GPU stage asks for ``GPU: n`` worker resources (a worker per GPU declares one)."""
    if not plan.dask_resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=plan.dask_resources)


@flow(name="genai-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(repo_root: str = ".", params_file: str = "params.yaml", force: bool = False,
             overrides: list[str] | None = None) -> dict:
    """Run every out-of-date stage of dvc.yaml, record the run, publish its artifacts; returns what ran,
    the run's record and the report's path. Raises ``RegressionFlagged`` (the run ends Failed) when the
    report flags a regression and ``report.fail_on_regression`` is set."""
    logger = get_run_logger()
    root = Path(repo_root).resolve()
    overrides = list(overrides or [])
    config = check_inputs(root, params_file, overrides)  # invalid params or missing data stop the run before any work
    with run_lock(root, flow_run.id) as crashed:
        for run_id in crashed:
            logger.warning("an earlier run (flow run %s) was killed before it finished: marked Crashed", run_id)
        if repaired := restore_left_behind(root):
            logger.warning("%s", repaired)
            config = check_inputs(root, params_file, overrides)
        with params_in_place(root, run_params(root, params_file, overrides)):
            stages = stage_order(root)
            gpus = visible_gpus(config)
            plans = plan_stages(config, {name: command for name, command, _ in stages}, gpus, pool=str(flow_run.id))
            if gpus:
                logger.info("GPUs handed out one stage at a time each: %s (%s task runner)", ", ".join(gpus),
                            config.orchestration.task_runner)
                POOLS[str(flow_run.id)] = GpuPool(gpus)
            futures = {}
            try:
                for name, command, upstream in stages:
                    with _dask_resources(plans[name]):
                        futures[name] = reproduce_stage.submit(root, name, command, force,
                                                               config.orchestration.max_parallel_stages, plans[name],
                                                               wait_for=[futures[u] for u in upstream])
                wait(list(futures.values()))  # leave the lock only when no stage is running
            finally:
                POOLS.pop(str(flow_run.id), None)
            runs = [future.result() for future in futures.values()]
            ran = [r.name for r in runs if r.ran]
            run_name, recorded = record_run(root, ran, _record_message(params_file, overrides, ran))
        summary = publish_artifacts(root, config, run_name, ran, recorded)  # under the lock: this run's report
    if ran:
        logger.info("ran %d of %d stages: %s", len(ran), len(runs),
                    ", ".join(f"{r.name} ({r.wall_s} s)" for r in runs if r.ran))
    else:
        logger.info("nothing changed: all %d stages are up to date", len(runs))
    # Regressions count when this run made the report that flags them (a run that changed nothing has none).
    regressions = summary.get("regressions", []) if "report" in ran else []
    result = {"ran": [asdict(r) for r in runs if r.ran], "stages": len(runs), "report": str(root / config.report.path),
              "flow_run": str(flow_run.id), "task_runner": config.orchestration.task_runner, "run_record": run_name,
              "recorded": recorded, "previous_run": (summary.get("previous_run") or {}).get("name"),
              "regressions": regressions, "overrides": overrides, "params_file": params_file}
    atomic_write_json(root / LAST_RUN, result)
    for line in regressions:
        logger.warning("regression since run %s: %s", result["previous_run"], line)
    if regressions and config.report.fail_on_regression:
        raise RegressionFlagged(f"{len(regressions)} regression(s) flagged and report.fail_on_regression is set: "
                                + " ".join(regressions), result)
    return result


def _record_message(params_file: str, overrides: list[str], ran: list[str]) -> str:
    """The experiment commit's message: what ran, and with which params."""
    source = "" if params_file == "params.yaml" else f" --params {params_file}"
    sets = "".join(f" -S {o}" for o in overrides)
    return (f"genai-pipeline run (flow run {flow_run.name}, {flow_run.id}){source}{sets}\n\n"
            f"stages run: {', '.join(ran) or 'none'}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root holding dvc.yaml and params.yaml")
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="run with FILE in place of params.yaml (it is params.yaml while the run works; the "
                             "checkout's own comes back afterwards)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, as `dvc exp run -S` does (repeatable; +key=value adds "
                             "a key, ~key removes one)")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    root = Path(args.repo).resolve()
    try:
        config = check_inputs(root, args.params, args.overrides)
        gpus = visible_gpus(config)
        with reserve(root):  # before any Prefect server starts: a refused run starts and records nothing
            # Should this process be killed, a watchdog stops what it started (the temporary
            # Prefect server, Dask workers) instead of leaving them running under pid 1.
            stop_children_with_this_process()
            start_temporary_server()
            runner = make_task_runner(config.orchestration, gpus)
            try:
                result = pipeline.with_options(task_runner=runner)(args.repo, args.params, args.force, args.overrides)
            except RegressionFlagged as err:
                print_outcome(err.result)
                print(f"error: {err}", file=sys.stderr)
                return 1
    except (ParamsError, DataError, PipelineBusy) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2
    print_outcome(result)
    return 0


def print_outcome(result: dict) -> None:
    """What a person running the flow wants to know at the end: the report, the record, regressions."""
    print(f"report: {result['report']}")
    if result.get("run_record"):
        compare = (f"; compare: dvc metrics diff {result['previous_run']} {result['run_record']}"
                   if result.get("previous_run") and result["previous_run"] != result["run_record"] else "")
        print(f"run record: DVC experiment {result['run_record']} (dvc exp show){compare}")
    for line in result.get("regressions", []):
        print(f"regression since run {result['previous_run']}: {line}")
    if result.get("overrides") or result.get("params_file", "params.yaml") != "params.yaml":
        print("params.yaml is the checkout's own again; dvc.lock and the outputs are this run's (with its params), "
              "so `dvc status` shows those stages as changed until the next run. "
              f"To keep these params: dvc exp apply {result.get('run_record') or '<run>'}")


if __name__ == "__main__":
    sys.exit(main())
