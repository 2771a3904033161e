"""Entry points that ``dvc.yaml`` stages call: ``python -m flows.cli <step> [family]``.

Each one validates ``params.yaml`` first, then runs exactly one step from ``tasks``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from tasks.config import ParamsError, load_params
from tasks.runtime import setup_logging

log = logging.getLogger("flows.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.cli", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the pipeline configuration (default: params.yaml)")
    steps = parser.add_subparsers(dest="step", required=True)
    prepare = steps.add_parser("prepare", help="download / read and preprocess a data set")
    prepare.add_argument("modality", choices=["image", "text"])
    steps.add_parser("features", help="train the FID feature extractor and measure the real-data floor")
    for name, text in (("train", "train one family"), ("evaluate", "evaluate one trained family")):
        step = steps.add_parser(name, help=text)
        step.add_argument("family")
    steps.add_parser("report", help="render the HTML comparison report")
    steps.add_parser("check", help="only validate params.yaml")
    return parser


def run(argv: list[str] | None = None) -> Path | None:
    """Parse arguments, validate params, run the step; returns the step's main output."""
    args = _parser().parse_args(argv)
    config = load_params(args.params)
    family = getattr(args, "family", None)
    if family is not None and family not in config.families:
        raise ParamsError(f"{args.params}: family {family!r} is not under 'families' (have: {', '.join(config.families)})")
    # Each step imports only its own module: a stage is a fresh process, and imports are a
    # noticeable share of a short step's wall time.
    if args.step == "prepare":
        from tasks import data, paths

        data.prepare(args.modality, config, paths.data_dir(args.modality))
        return paths.data_dir(args.modality)
    if args.step == "features":
        from tasks import features

        return features.build_feature_extractor(config)
    if args.step == "train":
        from tasks import distributed, paths, train

        processes = config.families[family].train.distributed
        if processes is not None and distributed.LAUNCHED not in os.environ:  # not yet under torchrun
            from tasks.runtime import resolve_device

            key = f"families.{family}.train.distributed"
            count = distributed.processes(processes, resolve_device(config.device), key)
            distributed.launch(count, ["--params", args.params, "train", family])
            return paths.model_dir(family)
        return train.train_family(config, family)
    if args.step == "evaluate":
        from tasks import evaluate

        return evaluate.evaluate_family(config, family)
    if args.step == "report":
        from tasks import report

        return report.build_report(config)
    log.info("%s is valid: families %s", args.params, ", ".join(config.families))
    return None


def stop_when_parent_dies(env_var: str = "GENAI_PIPELINE_PARENT_PID") -> None:
    """When the flow started this step (it sets ``env_var``), exit once the flow's process is gone.

    A killed flow must not leave its steps running on as orphans beside the next run.
    The step's own atomic writes make stopping at any point safe.
    """
    pid = int(os.environ.get(env_var) or 0)
    if pid <= 0:
        return
    import psutil

    def alive() -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while alive():
            time.sleep(1.0)
        log.error("the pipeline process %d that started this step is gone (killed?): stopping", pid)
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    stop_when_parent_dies()
    from tasks.checkpoints import CheckpointError
    from tasks.datasets import DataError
    from tasks.distributed import DistributedError
    from tasks.io import DiskFullError
    from tasks.train import TrainingDiverged

    expected = (ParamsError, DataError, FileNotFoundError, TrainingDiverged, CheckpointError, DiskFullError,
                DistributedError)
    try:
        output = run(argv)
    except expected as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if output is not None:
        log.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
