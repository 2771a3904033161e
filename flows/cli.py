"""Entry points that ``dvc.yaml`` stages call: ``python -m flows.cli <step> [family]``.

Each one validates its own inputs before any work, so ``dvc repro`` and a step run by hand
get the same protection as the Prefect flow: ``params.yaml``, the step's input files (data
sources must be regular files within their size caps; earlier steps' outputs must exist),
the model's size for the machine, and that its outputs can be written. Then it takes the
checkout's run lock shared (``flows.run_lock.stage_lock``): no step starts beside a flow run
that is not its own. Bad input ends in one ``error:`` line and exit status 2.

    python -m flows.cli train vae              # one step
    python -m flows.cli --dry-run train vae    # only the checks: would this step start?
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from tasks.config import ParamsError, PipelineConfig, load_params
from tasks.runtime import setup_logging

log = logging.getLogger("flows.cli")
MAX_ERROR_LENGTH = 1000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the pipeline configuration (default: params.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate params.yaml and the step's inputs and outputs, then stop without doing it")
    steps = parser.add_subparsers(dest="step", required=True)
    prepare = steps.add_parser("prepare", help="download / read and preprocess a data set")
    prepare.add_argument("modality", choices=["image", "text"])
    steps.add_parser("features", help="train the FID feature extractor and measure the real-data floor")
    for name, text in (("train", "train one family"), ("evaluate", "evaluate one trained family")):
        step = steps.add_parser(name, help=text)
        step.add_argument("family")
    steps.add_parser("report", help="render the HTML comparison report")
    steps.add_parser("check", help="only validate params.yaml and the data sources it names")
    return parser


def preflight(step: str, config: PipelineConfig, family: str | None = None, modality: str | None = None) -> None:
    """The step's own checks, before any work; each problem raises an error naming the key or file."""
    from tasks import paths
    from tasks.io import check_writable

    if step == "prepare":
        from tasks.datasets import check_image_source, check_text_source

        if modality == "image":
            check_image_source(config.data.images, extractor=config.features.extractor)
        else:
            check_text_source(config.data.text)
        check_writable(paths.data_dir(modality).parent)
    elif step == "features":
        from tasks import data

        data.load_image_manifest(paths.IMAGE_DATA)  # FileNotFoundError: run the data step first
        if config.features.extractor == "inception":
            from tasks.io import InputError, check_regular_file

            try:
                check_regular_file(config.features.inception_weights or "", 2**31)
            except InputError as err:
                raise ParamsError(f"features.inception_weights: {err}") from None
        check_writable(paths.FEATURE_EXTRACTOR.parent)
    elif step == "train":
        from tasks.train import check_can_train

        check_can_train(config, family)
    elif step == "evaluate":
        checkpoint = paths.model_dir(family) / "model.pt"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} not found: run `python -m flows.cli train {family}` first")
        check_writable(paths.evaluation_dir(family).parent)
        check_writable(paths.metrics_file(family).parent)
    elif step == "report":
        from tasks.report import confined_report_path

        out = confined_report_path(config.report.path)
        check_writable(out.parent)


def run(argv: list[str] | None = None) -> Path | None:
    """Parse arguments, validate params and the step's inputs, run the step; returns its main output."""
    args = _parser().parse_args(argv)
    config = load_params(args.params)
    family = getattr(args, "family", None)
    if family is not None and family not in config.families:
        raise ParamsError(f"{args.params}: family {family!r} is not under 'families' "
                          f"(have: {', '.join(config.families)})")
    if args.step == "check":
        from tasks.datasets import check_sources

        check_sources(config.data.images, config.data.text, extractor=config.features.extractor)
        log.info("%s is valid: families %s", args.params, ", ".join(config.families))
        return None
    from flows.run_lock import stage_lock

    command = " ".join(["python -m flows.cli", *(argv if argv is not None else sys.argv[1:])])
    with stage_lock(Path("."), command):
        preflight(args.step, config, family, getattr(args, "modality", None))
        if args.dry_run:
            log.info("%s: every check passed (dry run: nothing done)", command)
            return None
        return _do(args.step, config, family, getattr(args, "modality", None), args.params)


def _do(step: str, config: PipelineConfig, family: str | None, modality: str | None, params: str) -> Path | None:
    # Each step imports only its own module: a stage is a fresh process, and imports are a
    # noticeable share of a short step's wall time.
    if step == "prepare":
        from tasks import data, paths

        data.prepare(modality, config, paths.data_dir(modality))
        return paths.data_dir(modality)
    if step == "features":
        from tasks import features

        return features.build_feature_extractor(config)
    if step == "train":
        from tasks import distributed, paths, train

        processes = config.families[family].train.distributed
        if processes is not None and distributed.LAUNCHED not in os.environ:  # not yet under torchrun
            from tasks.runtime import resolve_device

            key = f"families.{family}.train.distributed"
            count = distributed.processes(processes, resolve_device(config.device), key)
            distributed.launch(count, ["--params", params, "train", family])
            return paths.model_dir(family)
        return train.train_family(config, family)
    if step == "evaluate":
        from tasks import evaluate

        return evaluate.evaluate_family(config, family)
    from tasks import report

    return report.build_report(config)


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


def one_line(message: object, limit: int = MAX_ERROR_LENGTH) -> str:
    """An error message on one line of at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    stop_when_parent_dies()
    from flows.run_lock import PipelineBusy
    from tasks.checkpoints import CheckpointError
    from tasks.datasets import DataError
    from tasks.distributed import DistributedError
    from tasks.io import Busy, DiskFullError, InputError, OutputError
    from tasks.train import TrainingDiverged

    expected = (ParamsError, DataError, FileNotFoundError, TrainingDiverged, CheckpointError, DiskFullError,
                InputError, OutputError, Busy, PipelineBusy, DistributedError)
    try:
        output = run(argv)
    except expected as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:  # an output that cannot be written
        print(f"error: {one_line(f'cannot write {err.filename}: {err.strerror}')}", file=sys.stderr)
        return 2
    if output is not None:
        log.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
