"""Timing helpers, the record of one figure, machine info and the result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tasks.io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    """One measured number: its median over repeats, spread, target and how it was made."""

    item: str                 # e.g. "1. training throughput"
    name: str                 # e.g. "vae: ours / plain"
    unit: str
    median: float | None
    min: float | None = None
    max: float | None = None
    repeats: int = 0
    target: str = ""          # e.g. ">= 0.95"; empty: reported, no target
    status: str = "info"      # pass | FAIL | info | skipped
    how: str = ""

    @classmethod
    def from_values(cls, item: str, name: str, unit: str, values: list[float], how: str,
                    target: Callable[[float], bool] | None = None, target_text: str = "") -> "Figure":
        median = statistics.median(values)
        status = "info" if target is None else ("pass" if target(median) else "FAIL")
        return cls(item, name, unit, median, min(values), max(values), len(values), target_text, status, how)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds one call of ``fn`` takes (perf_counter), and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Run a, b, a, b, ... ``repeats`` times each; seconds of every call of each."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a)[0])
        times_b.append(timed(b)[0])
    return times_a, times_b


def machine_info() -> dict:
    """CPU model, cores, load, torch version and threads: what the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def write_results(figures: list[Figure], meta: dict, out_dir: Path = RESULTS_DIR,
                  stem: str = "results") -> tuple[Path, Path]:
    """<stem>.json (machine, command, every figure) and <stem>.md (the table); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {**meta, "figures": [asdict(f) for f in figures]}
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown(figures, meta))
    return json_path, md_path


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown_table(figures: list[Figure]) -> str:
    """The figures as one markdown table."""
    rows = ["| item | figure | median | min–max | n | target | status |",
            "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for f in figures:
        spread = f"{_fmt(f.min)}–{_fmt(f.max)}" if f.min is not None else "—"
        name = f.name.replace("|", "\\|")  # a pipe would end the cell
        rows.append(f"| {f.item} | {name} | {_fmt(f.median)} {f.unit} | {spread} | {f.repeats} | "
                    f"{f.target or '—'} | {f.status} |")
    return "\n".join(rows) + "\n"


def markdown(figures: list[Figure], meta: dict) -> str:
    machine = meta.get("machine", {})
    lines = [
        "# Benchmark results", "",
        f"`{meta.get('command', '')}` on {machine.get('cpu')} ({machine.get('logical_cores')} logical cores, "
        f"torch {machine.get('torch')}, {machine.get('torch_threads')} threads, "
        f"load average at start {machine.get('load_average_at_start')}), {meta.get('finished', '')}.", "",
        "Absolute timings depend on the machine's load; comparisons are ratios of interleaved timings "
        "taken in the same run. How each figure was made:", "",
        markdown_table(figures), "",
    ]
    lines += [f"- **{f.item} / {f.name}**: {f.how}" for f in figures]
    return "\n".join(lines) + "\n"


def command_line(module: str = "benchmarks.run") -> str:
    """How this benchmark was started, as a person would type it (``python -m <module> <args>``)."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])
