"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Writes ``benchmarks/results/results.json`` and ``results.md`` and prints the table.
Names: training (1), metrics (2), pipeline (3 and 4), generation (5).

``python -m benchmarks.run --gpu [--quick]`` measures GPU training instead (6, benchmarks/gpu.py)
and writes ``benchmarks/results/gpu.json`` and ``gpu.md``; without a CUDA GPU it says so, writes
nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
import traceback

from benchmarks.common import Figure, command_line, machine_info, markdown_table, write_results

SUITES = ("training", "metrics", "pipeline", "generation")


def run_suite(name: str, quick: bool, meta: dict) -> list[Figure]:
    if name == "training":
        from benchmarks.training import matmul_peak_flops, training_figures

        rates, how = matmul_peak_flops(repeats=5 if quick else 11)
        peak = max(rates)  # a peak: load only ever lowers it
        meta["fp32_matmul_peak_gflops"] = {"max": peak / 1e9, "all": [r / 1e9 for r in rates], "how": how}
        return [Figure.from_values("1. peak", "fp32 matmul", "GFLOP/s", [r / 1e9 for r in rates],
                                   f"{how}; the max is used as the peak for MFU")] + training_figures(quick, peak, how)
    if name == "metrics":
        from benchmarks.metrics import bleu_figures, fid_figures, iwae_figures

        return bleu_figures(quick) + fid_figures(quick) + iwae_figures(quick)
    if name == "pipeline":
        from benchmarks.pipeline import pipeline_figures

        return pipeline_figures(quick)
    from benchmarks.training import generation_figures

    return generation_figures(quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, and the pipeline on tiny params (minutes instead of ~30 min)")
    parser.add_argument("--only", nargs="+", choices=SUITES, metavar="NAME",
                        help=f"run only these: {', '.join(SUITES)}")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU training throughput at the full-size profile (needs a CUDA GPU); "
                             "writes gpu.json / gpu.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    meta = {"command": command_line(), "quick": args.quick, "machine": machine_info(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.gpu:
        return run_gpu(args.quick, meta)
    figures: list[Figure] = []
    for name in args.only or SUITES:
        start = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            new = run_suite(name, args.quick, meta)
        except Exception as err:  # one broken suite must not hide the others' results
            traceback.print_exc()
            new = [Figure(name, "error", "", None, status="FAIL", how=f"{type(err).__name__}: {err}")]
        figures += new
        print(markdown_table(new), f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    json_path, md_path = write_results(figures, meta)
    print("\n" + markdown_table(figures))
    print("Timings on a shared machine are noisy; comparisons are interleaved ratios from the same run.")
    print(f"wrote {json_path} and {md_path}")
    return 1 if any(f.status == "FAIL" for f in figures) else 0


def run_gpu(quick: bool, meta: dict) -> int:
    """Item 6 only; exit status 2 (nothing written) without a CUDA GPU, 1 when a target fails."""
    from benchmarks.gpu import NoGPU, gpu_figures

    try:
        figures = gpu_figures(quick)
    except NoGPU as err:
        print(f"error: {err}: the GPU benchmark measures training on a CUDA GPU and was not run; "
              "nothing was written (benchmarks/results/gpu.json is unchanged)", file=sys.stderr)
        return 2
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    json_path, md_path = write_results(figures, meta, stem="gpu")
    print(markdown_table(figures))
    print(f"wrote {json_path} and {md_path}")
    return 1 if any(f.status == "FAIL" for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
