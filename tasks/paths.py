"""Where each step reads and writes, relative to the repository root (the working directory).

``dvc.yaml`` declares the same paths as stage deps and outs.
"""

from pathlib import Path

IMAGE_DATA = Path("data/images")
TEXT_DATA = Path("data/text")
FEATURE_EXTRACTOR = Path("models/feature_extractor")
REFERENCE_METRICS = Path("evaluation/reference")
RUN_STATE = Path(".runs")  # resumable training state; not an output, not versioned


def data_dir(modality: str) -> Path:
    return IMAGE_DATA if modality == "image" else TEXT_DATA


def model_dir(family: str) -> Path:
    return Path("models") / family


def evaluation_dir(family: str) -> Path:
    return Path("evaluation") / family


def metrics_file(family: str) -> Path:
    """The family's metrics as DVC metrics (``dvc metrics show``), outside any cached output."""
    return Path("metrics") / f"{family}.json"
