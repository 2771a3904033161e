"""Orchestration against a real local Prefect server: a killed flow run marked Crashed by the
next run; and (slow) scheduled retraining served with ``flows.deploy`` with its overlap policy,
bad data through a flow run, and stages on a two-worker Dask cluster.

One ``prefect server start`` (SQLite in a temporary PREFECT_HOME, loopback port) serves the
module; every pipeline runs in its own temporary git + DVC repository (tests/pipeline_repo.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil
import pytest
import yaml

from tests.pipeline_repo import PYTHON, clean_env, free_port, make_repo, run, tiny_params

DEPLOYMENT = "genai-retraining/scheduled-retraining"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory) -> str:
    """A real Prefect server on a free loopback port; terminated after the module."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = clean_env(home, PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: _healthy(url) or server.poll() is not None, 120, "the Prefect server to start")
        assert server.poll() is None, (home / "server.log").read_text()[-3000:]
        yield url
    finally:
        stop(server, signal.SIGTERM, timeout=30)
        log.close()


def stop(process: subprocess.Popen, sig: int, timeout: float) -> None:
    """Send ``sig``; if the process has not exited after ``timeout`` s, SIGKILL its process group."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(condition: Callable[[], object], timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)
    return value


def client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


def deployment_runs(url: str, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with client(url) as api:
        return api.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                  sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def run_logs(url: str, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(url) as api:
        logs = api.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(entry.message for entry in logs)


def wait_for_log(url: str, flow_run_id, text: str, timeout: float = 60) -> None:
    """Logs reach the API in batches, shortly after the run's state: wait for ``text``."""
    wait_until(lambda: text in run_logs(url, flow_run_id), timeout, f"{text!r} in the logs of run {flow_run_id}")


def state_of(url: str, flow_run_id):
    with client(url) as api:
        return api.read_flow_run(flow_run_id).state


# --- A: scheduled retraining ------------------------------------------------------------------
@pytest.mark.slow
def test_a_served_schedule_retrains_then_finds_nothing_changed_and_never_overlaps(api_url, tmp_path):
    repo = make_repo(tmp_path / "served", families=("vae",))
    env = clean_env(repo, PREFECT_API_URL=api_url, PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([PYTHON, "-m", "flows.deploy", "--interval", "30"], cwd=repo, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def deployment():
            try:
                with client(api_url) as api:
                    return api.read_deployment_by_name(DEPLOYMENT)
            except Exception:  # not created yet
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                return None

        served = wait_until(deployment, 120, "the deployment")
        assert served.global_concurrency_limit.limit == 1
        assert served.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert served.schedules[0].schedule.interval.total_seconds() == 30

        # Overlap: a run asked for while a scheduled one is running is cancelled, not run beside it.
        first = wait_until(lambda: next((r for r in deployment_runs(api_url, served.id)
                                         if r.state.is_running()), None), 120, "a scheduled run to start")
        with client(api_url) as api:
            extra = api.create_flow_run_from_deployment(served.id)
        assert wait_until(lambda: state_of(api_url, extra.id).type.value in ("CANCELLED", "COMPLETED", "FAILED"),
                          120, "the overlapping run to be settled")
        assert state_of(api_url, extra.id).is_cancelled()

        assert wait_until(lambda: state_of(api_url, first.id).is_final(), 400, "the first run to finish")
        assert state_of(api_url, first.id).is_completed(), run_logs(api_url, first.id)[-3000:]
        wait_for_log(api_url, first.id, "retrained: prepare_image")
        report = repo / "reports" / "report.html"
        assert report.exists() and "vae" in report.read_text()
        assert any((repo / "dvc-storage").rglob("*")), "dvc push put nothing into the remote"

        def later_completed():
            return [r for r in deployment_runs(api_url, served.id)
                    if r.state.is_completed() and r.start_time > first.start_time]
        second = wait_until(later_completed, 150, "a second scheduled run")[0]
        wait_for_log(api_url, second.id, "nothing changed")
        assert second.total_run_time.total_seconds() < 30

        completed = sorted((r for r in deployment_runs(api_url, served.id) if r.state.is_completed()),
                           key=lambda r: r.start_time)
        for before, after in zip(completed, completed[1:]):
            assert before.end_time <= after.start_time, "two scheduled runs overlapped"
    finally:
        stop(serve, signal.SIGTERM, timeout=60)  # what a service manager sends: stop serving, pause the schedule
        log.close()
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    with client(api_url) as api:
        assert api.read_deployment_by_name(DEPLOYMENT).paused


# --- C: a killed flow run ------------------------------------------------------------------------
def test_a_killed_flow_run_is_marked_crashed_by_the_next_run(api_url, tmp_path):
    params = tiny_params(["vae"])
    params["families"]["vae"]["train"].update(steps=100_000, checkpoint_every=20, log_every=100)
    repo = make_repo(tmp_path / "killed", families=("vae",), params=params, stages=("prepare_image", "train"))
    env = clean_env(repo, PREFECT_API_URL=api_url)
    flow = subprocess.Popen([PYTHON, "-m", "flows.pipeline"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: (repo / ".runs" / "vae" / "seed-0" / "state.pt").exists() or flow.poll() is not None, 300,
               "training to be under way", every=0.2)
    assert flow.poll() is None, flow.stdout.read()[-3000:]
    record = json.loads((repo / ".runs" / "pipeline-run.json").read_text())
    [killed_run] = record["flow_runs"]
    stage_processes = psutil.Process(flow.pid).children(recursive=True)
    assert any("train" in " ".join(p.cmdline()) for p in stage_processes)

    flow.send_signal(signal.SIGKILL)
    flow.wait()
    _, alive = psutil.wait_procs(stage_processes, timeout=20)
    assert alive == [], "the stage processes went on without their flow"
    assert state_of(api_url, killed_run).is_running()  # what a killed process leaves behind

    params["families"]["vae"]["train"]["steps"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([PYTHON, "-m", "flows.pipeline"], repo, env)
    assert f"an earlier run (flow run {killed_run}) was killed" in result.stdout + result.stderr

    state = state_of(api_url, killed_run)
    assert state.is_crashed()
    assert f"pid {flow.pid}" in state.message and "killed" in state.message
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(api_url) as api:
        tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[killed_run])))
    assert {t.name: t.state.type.value for t in tasks}.get("train@vae") == "CRASHED"
    assert not (repo / ".runs" / "pipeline-run.json").exists()


# --- D: corrupt data through a flow run ------------------------------------------------------------
@pytest.mark.slow
def test_corrupt_data_fails_the_flow_at_its_stage_and_overwrites_nothing(api_url, tmp_path):
    params = tiny_params(["transformer_lm"])
    params["data"]["text"].update(dataset="file", path="sentences.txt", max_train=None, min_freq=1)
    repo = make_repo(tmp_path / "corrupt", families=("transformer_lm",), params=params,
                     stages=("prepare_text", "train"))
    sentences = repo / "sentences.txt"
    sentences.write_text("".join(f"the cat number {i} sat on the mat today\n" for i in range(300)))
    env = clean_env(repo, PREFECT_API_URL=api_url)
    run([PYTHON, "-m", "flows.pipeline"], repo, env)
    before = {p: p.read_bytes() for p in sorted((repo / "data" / "text").iterdir())}
    lock_before = (repo / "dvc.lock").read_text()

    sentences.write_bytes(b"the cat \xff\xfe sat\n" * 300)  # not UTF-8
    # --force: the file is named in params.yaml, and DVC does not track its content
    result = run([PYTHON, "-m", "flows.pipeline", "--force"], repo, env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sentences.txt is not UTF-8 text" in output
    assert "train@transformer_lm: running" not in output  # nothing after the failed stage ran
    assert {p: p.read_bytes() for p in sorted((repo / "data" / "text").iterdir())} == before
    assert (repo / "dvc.lock").read_text() == lock_before


# --- E: scale-out on Dask ------------------------------------------------------------------------
@pytest.mark.slow
def test_families_train_at_once_on_a_two_worker_dask_cluster(api_url, tmp_path):
    params = tiny_params(["vae", "dcgan"])
    params["orchestration"].update(task_runner="dask", max_parallel_stages=2)
    for family in ("vae", "dcgan"):
        params["families"][family]["train"]["steps"] = 60  # long enough for the two to overlap
    # prepare_image, then the two families' train stages: nothing else competes for the two workers
    repo = make_repo(tmp_path / "dask", families=("vae", "dcgan"), params=params, stages=("prepare_image", "train"))
    env = clean_env(repo, PREFECT_API_URL=api_url)
    flow = subprocess.Popen([PYTHON, "-m", "flows.pipeline"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = flow.communicate(timeout=900)
    assert flow.returncode == 0, output[-4000:]

    last = json.loads((repo / ".runs" / "pipeline-last-run.json").read_text())
    assert last["task_runner"] == "dask"
    ran = {r["name"]: r for r in last["ran"]}
    assert set(ran) == {"prepare_image", "train@vae", "train@dcgan"}
    vae, dcgan = ran["train@vae"], ran["train@dcgan"]
    assert vae["worker"] != dcgan["worker"]  # two worker processes, neither of them the flow's
    assert not any(r["worker"].endswith(f":{flow.pid}") for r in ran.values())
    assert max(vae["started"], dcgan["started"]) < min(vae["finished"], dcgan["finished"]), "trained one by one"
    # Every stage was committed to dvc.lock (status and commit serialized across the workers).
    assert "up to date" in run(["dvc", "status"], repo, env).stdout
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(ran)
    assert (repo / "models" / "vae" / "model.pt").exists() and (repo / "models" / "dcgan" / "model.pt").exists()
