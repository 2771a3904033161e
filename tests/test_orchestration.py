"""Orchestration against a real local Prefect server: a killed flow run marked Crashed by the
next run; and (slow) scheduled retraining served with ``flows.deploy`` with its overlap policy,
bad data through a flow run, and stages on a two-worker Dask cluster.

One ``prefect server start`` (SQLite in a temporary PREFECT_HOME, loopback port) serves the
module; every pipeline runs in its own temporary git + DVC repository (tests/pipeline_repo.py).
"""

from __future__ import annotations

import json
import os
import re
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
    params["families"]["vae"]["train"].update(steps=100_000, checkpoint_every=20, log_every=100, eval_every=None)
    repo = make_repo(tmp_path / "killed", families=("vae",), params=params,
                     stages=("prepare_image", "features", "train"))
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
    # prepare_image and features, then the two families' train stages: nothing else competes for the workers
    repo = make_repo(tmp_path / "dask", families=("vae", "dcgan"), params=params,
                     stages=("prepare_image", "features", "train"))
    env = clean_env(repo, PREFECT_API_URL=api_url)
    flow = subprocess.Popen([PYTHON, "-m", "flows.pipeline"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = flow.communicate(timeout=900)
    assert flow.returncode == 0, output[-4000:]

    last = json.loads((repo / ".runs" / "pipeline-last-run.json").read_text())
    assert last["task_runner"] == "dask"
    ran = {r["name"]: r for r in last["ran"]}
    assert set(ran) == {"prepare_image", "features", "train@vae", "train@dcgan"}
    vae, dcgan = ran["train@vae"], ran["train@dcgan"]
    assert vae["worker"] != dcgan["worker"]  # two worker processes, neither of them the flow's
    assert not any(r["worker"].endswith(f":{flow.pid}") for r in ran.values())
    assert max(vae["started"], dcgan["started"]) < min(vae["finished"], dcgan["finished"]), "trained one by one"
    # Every stage was committed to dvc.lock (status and commit serialized across the workers).
    assert "up to date" in run(["dvc", "status"], repo, env).stdout
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(ran)
    assert (repo / "models" / "vae" / "model.pt").exists() and (repo / "models" / "dcgan" / "model.pt").exists()


# --- F: runs you can watch: records, comparisons, artifacts, overrides ---------------------------
def artifacts(url: str, key: str) -> list:
    """Every version of the artifact ``key``, oldest first."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with client(url) as api:
        return api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                  sort=ArtifactSort.CREATED_DESC)[::-1]


def last_run(repo: Path) -> dict:
    return json.loads((repo / ".runs" / "pipeline-last-run.json").read_text())


def test_a_params_change_is_compared_flagged_published_and_fails_the_run(api_url, tmp_path, monkeypatch):
    """The flow's own logic end to end in seconds (tests/pipeline_repo.make_results_repo: a stage writing
    fake results, then the real report stage). The previous run is recorded in-process, as the flow's
    record step does; then one flow run with -S: the override reaches the stage, the report and the
    artifacts show the change and flag the regression, fail_on_regression fails the run, and the checkout
    keeps its params.yaml and tracked files. Two real flow runs with real training: the slow test below."""
    from flows.record import METRICS_ARTIFACT, REPORT_ARTIFACT, VERDICT_ARTIFACT, record_run
    from tasks.config import load_params
    from tasks.report import build_report
    from tests.fake_run import make_fake_run
    from tests.pipeline_repo import make_results_repo

    repo = make_results_repo(tmp_path / "results")
    env = clean_env(repo, PREFECT_API_URL=api_url)
    params_before = (repo / "params.yaml").read_bytes()
    with monkeypatch.context() as patch:  # the previous run: both stages' work, then its record
        patch.chdir(repo)
        for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
            patch.setenv(key, env[key])
        make_fake_run()
        build_report(load_params(repo / "params.yaml"))
        previous, _ = record_run(repo, ["results", "report"], "the previous run")

    hook = webhook_listener()  # where the README's notification (python -m flows.notify) will post
    run([PYTHON, "-m", "flows.notify", "--webhook", hook.url], repo, env)

    flow = run([PYTHON, "-m", "flows.pipeline", "-S", "families.vae.train.steps=2", "-S",
                "report.fail_on_regression=true"], repo, env, check=False)
    output = flow.stdout + flow.stderr
    assert flow.returncode == 1, output[-4000:]
    assert "1 regression(s) flagged and report.fail_on_regression is set" in output
    result = last_run(repo)
    assert result["previous_run"] == previous and result["run_record"] not in (None, previous)
    assert {r["name"] for r in result["ran"]} == {"results", "report"}
    assert "fake results written (vae trained 2 steps: FID 45.0)" in output  # -S reached the stage
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["results"]["params"]["params.yaml"]["families.vae.train"]["steps"] == 2
    assert (repo / "params.yaml").read_bytes() == params_before  # the checkout's own params are back
    status = run(["git", "status", "--porcelain"], repo, env).stdout.split("\n")
    assert sorted(filter(None, status)) == ["?? dvc.lock", "?? metrics/"]

    html = (repo / "reports" / "report.html").read_text()
    assert f"Compared with run <code>{previous}</code>" in html
    assert "<code>families.vae.train.steps</code>: 3000 → 2" in html and "⚠ +15 (+50%)" in html
    assert "(with uncommitted changes to params.yaml)" in html  # it ran on overridden params

    state = state_of(api_url, result["flow_run"])
    assert state.is_failed() and "regression(s) flagged" in state.message
    [table], [verdict], [link] = (artifacts(api_url, key) for key in (METRICS_ARTIFACT, VERDICT_ARTIFACT,
                                                                      REPORT_ARTIFACT))
    assert {str(a.flow_run_id) for a in (table, verdict, link)} == {result["flow_run"]}
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    fid = next(r for r in rows if r["family"] == "vae" and r["metric"] == "FID")
    assert fid == {"family": "vae", "metric": "FID", "better": "lower", "value": "45", "95% interval": "[42, 48]",
                   "previous": "30", "change": "+15 (+50%)", "regression": "REGRESSION"}
    assert f"**1 regression(s) since run {previous}**" in verdict.data
    assert "`families.vae.train.steps`: 3000 → 2" in verdict.data
    report_uri = (repo / "reports" / "report.html").as_uri()
    assert link.data == f"[report of {result['run_record']} (report.html)]({report_uri})"
    # The Prefect automation made by flows.notify sent the failure, with the regressions, to the webhook.
    [message] = wait_until(lambda: hook.received, 120, "the automation's notification")
    assert "genai-pipeline: run" in message and "1 regression(s) flagged" in message and "vae FID" in message
    hook.server.shutdown()


def webhook_listener():
    """A local HTTP endpoint that keeps the bodies POSTed to it (``.received``) at ``.url``."""
    import http.server
    import threading
    from types import SimpleNamespace

    received: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/hook", received=received, server=server)


def test_only_a_killed_stage_is_retried():
    """A stage killed by a signal (OOM killer, preemption) resumes on a retry; one that failed by itself
    (exit 1 or 2: a bug, bad input, diverged training) would fail the same way again."""
    from prefect.states import Failed

    from flows.pipeline import StageFailed, reproduce_stage, retry_if_killed

    assert reproduce_stage.retries == 1 and reproduce_stage.retry_condition_fn is retry_if_killed
    for returncode, retried in ((-9, True), (137, True), (1, False), (2, False), (-15, False)):
        state = Failed(data=StageFailed("stage train@vae failed", returncode))
        assert retry_if_killed(reproduce_stage, None, state) is retried, returncode
    assert not retry_if_killed(reproduce_stage, None, Failed(data=RuntimeError("not a stage")))


@pytest.mark.slow
def test_the_real_flow_twice_with_a_params_change_flags_the_regression(api_url, tmp_path):
    """The issue's done-when: the real flow (prepare, features, train, evaluate, report) twice, the second
    with -S families.vae.train.steps=2 (60 before): -S reaches the stages, the second report shows the
    change and flags the regression, the artifacts are there, and only dvc.lock and metrics/ changed."""
    from flows.record import METRICS_ARTIFACT, REPORT_ARTIFACT, VERDICT_ARTIFACT

    params = tiny_params(["vae"])
    params["families"]["vae"]["train"]["steps"] = 60
    repo = make_repo(tmp_path / "real", families=("vae",), params=params,
                     stages=("prepare_image", "features", "train", "evaluate_image", "report"))
    env = clean_env(repo, PREFECT_API_URL=api_url)
    params_before = (repo / "params.yaml").read_bytes()
    run([PYTHON, "-m", "flows.pipeline"], repo, env, timeout=1200)
    first = last_run(repo)
    run([PYTHON, "-m", "flows.pipeline", "-S", "families.vae.train.steps=2"], repo, env, timeout=1200)
    second = last_run(repo)
    assert second["previous_run"] == first["run_record"] and {r["name"] for r in second["ran"]} == {
        "train@vae", "evaluate_image@vae", "report"}

    assert json.loads((repo / "models" / "vae" / "summary.json").read_text())["steps"] == 2  # -S reached training
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["train@vae"]["params"]["params.yaml"]["families.vae"]["train"]["steps"] == 2
    assert (repo / "params.yaml").read_bytes() == params_before
    status = run(["git", "status", "--porcelain"], repo, env).stdout.split("\n")
    assert sorted(filter(None, status)) == ["?? dvc.lock", "?? metrics/"]

    html = (repo / "reports" / "report.html").read_text()
    since = html.split('<h2 id="since">', 1)[1].split("<h2", 1)[0]
    assert f"Compared with run <code>{first['run_record']}</code>" in since
    assert "<code>families.vae.train.steps</code>: 60 → 2" in since and "trend of vae" in since
    assert any(line.startswith("vae NLL bits/dim") for line in second["regressions"]), second["regressions"]
    assert '<span class="chg regression"' in html

    for key in (METRICS_ARTIFACT, VERDICT_ARTIFACT, REPORT_ARTIFACT):
        versions = artifacts(api_url, key)
        assert {str(a.flow_run_id) for a in versions} >= {first["flow_run"], second["flow_run"]}, key
    verdict = next(a for a in artifacts(api_url, VERDICT_ARTIFACT) if str(a.flow_run_id) == second["flow_run"])
    assert f"regression(s) since run {first['run_record']}" in verdict.data
    print("second report, 'since' section (text):", re.sub(r"<[^>]+>", " ", since)[:3000])  # shown on failure / -s
    print("artifacts:", {key: len(artifacts(api_url, key)) for key in (METRICS_ARTIFACT, VERDICT_ARTIFACT, REPORT_ARTIFACT)})
