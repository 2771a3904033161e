"""One stage per GPU: which stages need a GPU, which GPU each one gets, and the environment that pins it.

Processes that share a GPU time-slice it: eight training stages at once on one GPU each ran
about 10x slower than alone. So the flow hands every stage that uses a GPU (features, train,
evaluate) GPUs of its own, named in the stage's ``CUDA_VISIBLE_DEVICES``; a stage waits while
they are taken. CPU-only stages (prepare, report) need none and run beside them, with every GPU
hidden. A data-parallel training stage (``train.distributed``) takes as many GPUs as it has
processes.

Where the GPUs come from (``GpuPlan.mode``):

- ``pool`` (thread task runner): a ``GpuPool`` in the flow's process hands out GPU indices;
- ``dask-local`` (the local Dask cluster): one worker per GPU, each declaring the Dask resource
  ``GPU: 1``; a GPU stage asks for that resource and gets its worker's GPU;
- ``dask-remote`` (``dask_address``): workers started with ``--resources GPU=1`` and their own
  ``CUDA_VISIBLE_DEVICES``; a GPU stage asks for the resource and keeps the worker's GPUs;
- ``off``: no GPU visible, or ``device: cpu``: nothing is pinned.
"""

from __future__ import annotations

import os
import shlex
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

from tasks.config import OrchestrationConfig, ParamsError, PipelineConfig

CPU_ONLY_STEPS = ("prepare", "report", "check")  # `python -m flows.cli <step>` that never touch a GPU
GpuMode = Literal["off", "pool", "dask-local", "dask-remote"]


@dataclass(frozen=True)
class GpuPlan:
    """How one stage gets its GPUs: ``need`` of them (0: CPU-only), handed out as ``mode`` says."""

    mode: GpuMode = "off"
    need: int = 0
    gpus: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES entries of the GPUs the flow hands out
    pool: str = ""              # mode pool: the key of the flow's GpuPool

    @property
    def dask_resources(self) -> dict[str, int]:
        """The Dask resources the stage's task asks for."""
        return {"GPU": self.need} if self.mode.startswith("dask") and self.need else {}


def stage_step(command: str) -> tuple[str, list[str]]:
    """``python -m flows.cli [--params P] <step> [args]`` -> (step, args); ("", []) for other commands."""
    words = shlex.split(command)
    if "flows.cli" not in words:
        return "", []
    rest = words[words.index("flows.cli") + 1:]
    while rest and rest[0].startswith("--"):
        rest = rest[2:] if rest[0] == "--params" else rest[1:]
    return (rest[0], rest[1:]) if rest else ("", [])


def gpus_needed(command: str, config: PipelineConfig, available: int) -> int:
    """GPUs the stage running ``command`` uses: 0 for CPU-only steps, the processes of a data-parallel
    training stage, else 1."""
    step, args = stage_step(command)
    if step in CPU_ONLY_STEPS:
        return 0
    if step == "train" and args and args[0] in config.families:
        processes = config.families[args[0]].train.distributed
        if processes == "all":
            return available
        if processes is not None:
            return int(processes)
    return 1


def visible_gpus(config: PipelineConfig, count: int | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """``orchestration.gpus`` as CUDA_VISIBLE_DEVICES entries; [] when nothing is pinned.

    ``count``: GPUs visible to this process (default: torch's count). Indices are positions among
    them, so with ``CUDA_VISIBLE_DEVICES=2,3`` set for the flow, index 0 is GPU 2.
    """
    if config.device == "cpu":
        return []
    if count is None:
        import torch

        count = torch.cuda.device_count()
    if count == 0:
        return []
    environ = os.environ if environ is None else environ
    inherited = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    names = inherited[:count] if len(inherited) >= count else [str(i) for i in range(count)]
    wanted = config.orchestration.gpus
    if wanted == "all":
        return names
    missing = [i for i in wanted if i >= count]
    if missing:
        raise ParamsError(f"orchestration.gpus: GPU index(es) {missing} not visible: {count} GPU(s) are "
                          f"(indices 0..{count - 1})")
    return [names[i] for i in wanted]


def plan_stages(config: PipelineConfig, commands: dict[str, str], gpus: list[str], pool: str = "") -> dict[str, GpuPlan]:
    """Every stage's ``GpuPlan``; raises ``ParamsError`` for a stage that could never get its GPUs."""
    orchestration = config.orchestration
    if not gpus:
        return {name: GpuPlan() for name in commands}
    mode: GpuMode = "pool" if orchestration.task_runner == "thread" else (
        "dask-remote" if orchestration.dask_address else "dask-local")
    plans = {}
    for name, command in commands.items():
        need = gpus_needed(command, config, len(gpus))
        if need > len(gpus):
            raise ParamsError(f"stage {name} needs {need} GPUs (train.distributed) but orchestration.gpus "
                              f"hands out {len(gpus)}")
        if need > 1 and mode == "dask-local":
            raise ParamsError(f"stage {name} needs {need} GPUs (train.distributed): the local Dask cluster has one "
                              "GPU per worker; use task_runner: thread, or a dask_address whose workers declare "
                              f"GPU={need}")
        plans[name] = GpuPlan(mode, need, tuple(gpus), pool)
    return plans


class GpuPool:
    """GPUs handed to stages in the flow's process: ``take(n)`` waits until n are free, all at once."""

    def __init__(self, gpus: list[str]) -> None:
        self._all, self._free = list(gpus), list(gpus)
        self._changed = threading.Condition()

    @contextmanager
    def take(self, count: int) -> Iterator[list[str]]:
        """Hold ``count`` GPUs for the duration; waits while fewer are free (never a partial hold)."""
        if count > len(self._all):
            raise ValueError(f"asked for {count} GPUs, the pool has {len(self._all)}")
        with self._changed:
            self._changed.wait_for(lambda: len(self._free) >= count)
            taken, self._free = self._free[:count], self._free[count:]
        try:
            yield taken
        finally:
            with self._changed:
                self._free = [g for g in self._all if g in self._free or g in taken]
                self._changed.notify_all()


POOLS: dict[str, GpuPool] = {}  # flow run id -> its pool (thread task runner: the stages' threads share it)


@contextmanager
def stage_gpus(plan: GpuPlan) -> Iterator[str | None]:
    """The CUDA_VISIBLE_DEVICES value for the stage while it runs: "" hides every GPU, None leaves it as is."""
    if plan.mode == "off":
        yield None
    elif plan.need == 0:
        yield ""  # CPU-only: keep the GPUs for the stages that use them
    elif plan.mode == "pool":
        with POOLS[plan.pool].take(plan.need) as taken:
            yield ",".join(taken)
    elif plan.mode == "dask-local":
        from distributed import get_worker

        yield plan.gpus[int(get_worker().name) % len(plan.gpus)]  # worker i of the local cluster owns GPU i
    else:
        yield None  # dask-remote: the worker was started with its own CUDA_VISIBLE_DEVICES


def dask_cluster_kwargs(orchestration: OrchestrationConfig, gpus: list[str]) -> dict:
    """The local Dask cluster: one single-threaded worker per parallel stage; with GPUs, one worker per
    GPU declaring ``GPU: 1``, with a second thread for a CPU-only stage beside its GPU stage."""
    if gpus:
        return {"n_workers": len(gpus), "threads_per_worker": 2, "processes": True, "resources": {"GPU": 1}}
    return {"n_workers": orchestration.max_parallel_stages, "threads_per_worker": 1, "processes": True}
