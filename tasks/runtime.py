"""Run-time choices made at the edge: device, seeding, logging, and a step's resource record."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import resource
import sys
import time

import torch

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Progress lines on stderr: time, step logger, message."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def resolve_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from tasks.config import ParamsError

        raise ParamsError("params.yaml: device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(requested)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch; with ``deterministic``, deterministic kernels (bit-exact reruns), else cuDNN autotuning."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def deterministic_on(setting: bool | str, device: torch.device) -> bool:
    """``performance.deterministic`` resolved: auto means on for the CPU, off for CUDA."""
    return device.type != "cuda" if setting == "auto" else bool(setting)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


class StepClock:
    """Wall time and peak memory of a step, read when its outputs are written."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()

    def record(self) -> dict:
        wall = time.perf_counter() - self.start
        log.info("%s: %.1f s so far, peak RSS %.0f MiB", self.name, wall, peak_rss_mb())
        return {"step": self.name, "wall_s": round(wall, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed" (e.g. this project run from a plain checkout)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Progress:
    """Progress lines for a long loop, at most one every ``every`` seconds: done/total, rate and ETA.

    ``update(done)`` after each unit of work; silent when the whole loop is quick.
    """

    def __init__(self, what: str, total: int, unit: str, every: float = 5.0, logger: logging.Logger = log) -> None:
        self.what, self.total, self.unit, self.every, self.logger = what, total, unit, every, logger
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        self.logger.info("%s: %d/%d %s (%.3g/s, ETA %s)", self.what, done, self.total, self.unit, rate,
                         format_duration((self.total - done) / max(rate, 1e-9)))
