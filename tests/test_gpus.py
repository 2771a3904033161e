"""One stage per GPU (flows/gpus.py), on a CPU machine: which stages need GPUs, which GPU each gets
and when, the environment a stage runs with, and Dask's GPU resources on a real local cluster."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from flows.gpus import (
    POOLS, GpuPlan, GpuPool, dask_cluster_kwargs, gpus_needed, plan_stages, stage_gpus, stage_step, visible_gpus,
)
from flows.pipeline import _stage_environment, make_task_runner
from tasks.config import ParamsError, parse_params
from tests.conftest import REPO_ROOT
from tests.test_train import tiny_params

# The commands of the real dvc.yaml, one per kind of stage.
COMMANDS = {
    "prepare_image": "python -m flows.cli prepare image",
    "features": "python -m flows.cli features",
    "train@vae": "python -m flows.cli train vae",
    "train@dcgan": "python -m flows.cli train dcgan",
    "evaluate_image@vae": "python -m flows.cli evaluate vae",
    "report": "python -m flows.cli report",
}


def config_with(**orchestration):
    params = tiny_params()
    params["device"] = "auto"
    params["orchestration"].update(orchestration)
    return parse_params(params)


def test_the_commands_in_dvc_yaml_are_the_ones_classified_here():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    commands = {stage.get("cmd") or stage["do"]["cmd"] for stage in stages.values()}
    steps = {stage_step(command.replace("${key}", "vae").replace("${item}", "vae"))[0] for command in commands}
    assert steps == {"prepare", "features", "train", "evaluate", "report"}


def test_cpu_only_stages_need_no_gpu_and_data_parallel_training_needs_one_per_process():
    config = config_with()
    assert {name: gpus_needed(command, config, 4) for name, command in COMMANDS.items()} == {
        "prepare_image": 0, "features": 1, "train@vae": 1, "train@dcgan": 1, "evaluate_image@vae": 1, "report": 0}
    params = tiny_params()
    params["families"]["vae"]["train"]["distributed"] = 2
    assert gpus_needed("python -m flows.cli --params p.yaml train vae", parse_params(params), 4) == 2
    params["families"]["vae"]["train"]["distributed"] = "all"
    assert gpus_needed("python -m flows.cli train vae", parse_params(params), 4) == 4


def test_orchestration_gpus_names_visible_devices_and_refuses_missing_ones():
    config = config_with()  # gpus: all
    assert visible_gpus(config, count=0, environ={}) == []                   # no GPU: nothing pinned
    assert visible_gpus(config, count=2, environ={}) == ["0", "1"]
    # indices are positions among the GPUs the flow itself sees
    assert visible_gpus(config, count=2, environ={"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus(config_with(gpus=[1]), count=2, environ={}) == ["1"]
    with pytest.raises(ParamsError, match=r"orchestration\.gpus: GPU index\(es\) \[2\] not visible: 2 GPU"):
        visible_gpus(config_with(gpus=[0, 2]), count=2, environ={})
    params = tiny_params()
    params["device"] = "cpu"
    assert visible_gpus(parse_params(params), count=2, environ={}) == []    # device cpu: nothing pinned
    with pytest.raises(ParamsError, match=r"orchestration\.gpus: name at least one GPU index"):
        config_with(gpus=[])


def test_stage_plans_follow_the_task_runner_and_refuse_stages_that_could_never_start():
    plans = plan_stages(config_with(), COMMANDS, ["0"], pool="run-1")
    assert plans["train@vae"] == GpuPlan("pool", 1, ("0",), "run-1") and plans["report"].need == 0
    assert plan_stages(config_with(), COMMANDS, []) == {name: GpuPlan() for name in COMMANDS}
    dask = plan_stages(config_with(task_runner="dask"), COMMANDS, ["0", "1"])
    assert dask["train@vae"].mode == "dask-local" and dask["train@vae"].dask_resources == {"GPU": 1}
    assert dask["prepare_image"].dask_resources == {}
    remote = plan_stages(config_with(task_runner="dask", dask_address="tcp://x:8786"), COMMANDS, ["0"])
    assert remote["features"].mode == "dask-remote"

    params = tiny_params()
    params["families"]["vae"]["train"]["distributed"] = 2
    with pytest.raises(ParamsError, match=r"stage train@vae needs 2 GPUs .* hands out 1"):
        plan_stages(parse_params(params), COMMANDS, ["0"])
    params["orchestration"]["task_runner"] = "dask"
    with pytest.raises(ParamsError, match=r"local Dask cluster has one GPU per worker"):
        plan_stages(parse_params(params), COMMANDS, ["0", "1"])


def _run_stages(plans: dict[str, GpuPlan], hold: float) -> dict[str, tuple[str | None, float, float]]:
    """Run each plan's ``stage_gpus`` in its own thread, holding the GPUs ``hold`` seconds."""
    record: dict[str, tuple[str | None, float, float]] = {}

    def stage(name: str, plan: GpuPlan) -> None:
        with stage_gpus(plan) as visible:
            start = time.monotonic()
            time.sleep(hold)
            record[name] = (visible, start, time.monotonic())

    threads = [threading.Thread(target=stage, args=item) for item in plans.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return record


def _overlap(a: tuple, b: tuple) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_with_one_gpu_gpu_stages_run_one_at_a_time_and_cpu_stages_beside_them():
    POOLS["one-gpu"] = GpuPool(["0"])
    try:
        plans = plan_stages(config_with(max_parallel_stages=4), COMMANDS, ["0"], pool="one-gpu")
        record = _run_stages(plans, hold=0.2)
    finally:
        POOLS.pop("one-gpu")
    gpu_stages = [name for name in COMMANDS if plans[name].need]
    assert [record[name][0] for name in gpu_stages] == ["0"] * len(gpu_stages)
    for i, a in enumerate(gpu_stages):
        for b in gpu_stages[i + 1:]:
            assert not _overlap(record[a], record[b]), f"{a} and {b} shared the GPU"
    assert record["prepare_image"][0] == "" and record["report"][0] == ""  # GPUs hidden from CPU-only stages
    assert any(_overlap(record["prepare_image"], record[name]) for name in gpu_stages)


def test_a_multi_gpu_stage_takes_all_its_gpus_at_once():
    pool = GpuPool(["0", "1"])
    POOLS["two-gpus"] = pool
    try:
        two = GpuPlan("pool", 2, ("0", "1"), "two-gpus")
        one = GpuPlan("pool", 1, ("0", "1"), "two-gpus")
        record = _run_stages({"ddp": two, "a": one, "b": one, "c": one}, hold=0.2)
    finally:
        POOLS.pop("two-gpus")
    assert record["ddp"][0] == "0,1"
    assert all(not _overlap(record["ddp"], record[name]) for name in "abc")
    assert {record[name][0] for name in "abc"} <= {"0", "1"}
    assert pool._free == ["0", "1"]  # everything handed back


def test_a_stage_runs_with_its_gpus_pinned_and_cpu_only_stages_see_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    flow_run = "3f0c2b7e-flow-run"
    assert _stage_environment(1, flow_run, "1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert _stage_environment(1, flow_run, "")["CUDA_VISIBLE_DEVICES"] == ""
    assert _stage_environment(1, flow_run, None)["CUDA_VISIBLE_DEVICES"] == "0,1"  # not pinned: left as it was


def test_the_local_dask_cluster_has_one_worker_per_gpu_declaring_it(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # as if a server were configured: start none
    config = config_with(task_runner="dask", max_parallel_stages=3)
    assert dask_cluster_kwargs(config.orchestration, []) == {"n_workers": 3, "threads_per_worker": 1,
                                                             "processes": True}
    runner = make_task_runner(config.orchestration, ["0", "1"])
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["resources"] == {"GPU": 1}


def test_dask_gives_each_gpu_stage_its_workers_gpu_and_never_two_at_once():
    """A real local Dask cluster (in-process workers) with the GPU resources the pipeline declares."""
    import dask
    from distributed import Client, LocalCluster

    config = config_with(task_runner="dask")
    plans = plan_stages(config, COMMANDS, ["0", "1"])
    kwargs = {**dask_cluster_kwargs(config.orchestration, ["0", "1"]), "processes": False}

    def run(plan: GpuPlan) -> tuple[str | None, float, float, object]:
        from distributed import get_worker

        with stage_gpus(plan) as visible:
            start = time.monotonic()
            time.sleep(0.3)
            return visible, start, time.monotonic(), get_worker().name

    with LocalCluster(dashboard_address=None, **kwargs) as cluster, Client(cluster) as client:
        futures = {}
        for index in range(4):
            with dask.annotate(resources=plans["train@vae"].dask_resources):
                futures[f"gpu{index}"] = client.submit(run, plans["train@vae"], pure=False)
        futures["cpu"] = client.submit(run, plans["report"], pure=False)
        record = {name: future.result(timeout=60) for name, future in futures.items()}
    gpu = [record[f"gpu{i}"] for i in range(4)]
    for value, _, _, worker in gpu:
        assert value == ["0", "1"][int(worker)]  # worker i owns GPU i
    for i, a in enumerate(gpu):
        for b in gpu[i + 1:]:
            assert a[0] != b[0] or not _overlap(a, b), "two stages on one GPU at once"
    assert record["cpu"][0] == ""
