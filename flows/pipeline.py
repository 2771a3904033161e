"""The Prefect flow that runs the whole pipeline: prepare -> features/train -> evaluate -> report.

The steps and their inputs are declared once, in ``dvc.yaml``. This flow reads that
graph from DVC and, for every stage in dependency order, asks DVC whether the stage is
out of date (its deps, params or outs changed), runs the stage's own command if so, and
records the result in ``dvc.lock`` (``dvc commit``). So a flow run and ``dvc repro``
do the same work, skip the same things, and a ``dvc repro`` after a flow run is a no-op.

What Prefect adds: runs on a schedule (see flows/deploy.py), retries, concurrency of
independent stages (threads, or a Dask cluster: params.yaml ``orchestration``) with one
stage per GPU (flows/gpus.py), and a UI with every stage's logs. One run per checkout at a time; a run whose process was killed
is marked Crashed by the next one (flows/run_lock.py).

    python -m flows.pipeline            # run (starts a temporary Prefect server if none is configured)
    python -m flows.pipeline --force    # re-run every stage
"""

from __future__ import annotations

import argparse
import os
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

from flows.gpus import POOLS, GpuPlan, GpuPool, dask_cluster_kwargs, plan_stages, stage_gpus, visible_gpus  # noqa: E402
from flows.run_lock import FLOW_RUN_ENV, PipelineBusy, dvc_lock, reserve, run_lock  # noqa: E402
from flows.watchdog import stop_children_with_this_process  # noqa: E402
from tasks.config import OrchestrationConfig, ParamsError, PipelineConfig, load_params  # noqa: E402
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


@task(task_run_name="{name}")
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
            raise RuntimeError(f"stage {name} failed (exit {process.returncode}):\n" + "\n".join(tail))
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


def check_inputs(root: Path, params_file: str = "params.yaml") -> PipelineConfig:
    """Validate params.yaml and check the data it names is there: one clear error before any work.

    Raises ``ParamsError`` or ``DataError``.
    """
    config = load_params(root / params_file)
    check_sources(config.data.images, config.data.text, base=root, extractor=config.features.extractor)
    return config


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
def pipeline(repo_root: str = ".", params_file: str = "params.yaml", force: bool = False) -> dict:
    """Run every out-of-date stage of dvc.yaml; returns what ran and the report's path."""
    logger = get_run_logger()
    root = Path(repo_root).resolve()
    config = check_inputs(root, params_file)  # invalid params or missing data stop the run before any work
    stages = stage_order(root)
    gpus = visible_gpus(config)
    plans = plan_stages(config, {name: command for name, command, _ in stages}, gpus, pool=str(flow_run.id))
    if gpus:
        logger.info("GPUs handed out one stage at a time each: %s (%s task runner)", ", ".join(gpus),
                    config.orchestration.task_runner)
        POOLS[str(flow_run.id)] = GpuPool(gpus)
    with run_lock(root, flow_run.id) as crashed:
        for run_id in crashed:
            logger.warning("an earlier run (flow run %s) was killed before it finished: marked Crashed", run_id)
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
    ran = [r for r in runs if r.ran]
    if ran:
        logger.info("ran %d of %d stages: %s", len(ran), len(runs), ", ".join(f"{r.name} ({r.wall_s} s)" for r in ran))
    else:
        logger.info("nothing changed: all %d stages are up to date", len(runs))
    result = {"ran": [asdict(r) for r in ran], "stages": len(runs), "report": str(root / config.report.path),
              "flow_run": str(flow_run.id), "task_runner": config.orchestration.task_runner}
    atomic_write_json(root / LAST_RUN, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root holding dvc.yaml and params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    root = Path(args.repo).resolve()
    try:
        config = check_inputs(root, args.params)
        gpus = visible_gpus(config)
        with reserve(root):  # before any Prefect server starts: a refused run starts and records nothing
            # Should this process be killed, a watchdog stops what it started (the temporary
            # Prefect server, Dask workers) instead of leaving them running under pid 1.
            stop_children_with_this_process()
            start_temporary_server()
            runner = make_task_runner(config.orchestration, gpus)
            result = pipeline.with_options(task_runner=runner)(args.repo, args.params, args.force)
    except (ParamsError, DataError, PipelineBusy) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
