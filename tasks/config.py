"""``params.yaml`` -> typed, validated config. The only module that reads the file.

Every error names the ``params.yaml`` key and the bad value, and is raised before any
step does work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from genai_models.registry import REGISTRY

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageDataConfig(_Strict):
    dataset: Literal["mnist-5k", "mnist", "fashion-mnist", "cifar10", "idx"] = "mnist-5k"
    # torchvision data sets: the download root (archives already there are used offline);
    # idx: the folder holding the four IDX files.
    root: str | None = None
    download: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)  # used where the source has no test split
    max_train: int | None = Field(None, gt=0)
    # none: 8-bit grey levels. dynamic: black/white pixels, drawn as Bernoulli(level / 255) afresh
    # for every training batch; val and test binarized once with the seed (the protocol of the
    # binarized-MNIST likelihood literature). Values stay uint8 (0 or 255).
    binarize: Literal["none", "dynamic"] = "none"

    @model_validator(mode="after")
    def _root_for_idx(self) -> "ImageDataConfig":
        if self.dataset == "idx" and not self.root:
            raise ValueError("dataset 'idx' needs data.images.root: the folder with the IDX files")
        return self


class TextDataConfig(_Strict):
    dataset: Literal["lee-news", "file"] = "lee-news"
    path: str | None = None  # dataset 'file': one sentence per line
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    min_freq: int = Field(2, ge=1)
    max_tokens: int = Field(32, ge=2)  # sentences longer than this are dropped
    min_tokens: int = Field(3, ge=1)
    max_train: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _path_for_file(self) -> "TextDataConfig":
        if self.dataset == "file" and not self.path:
            raise ValueError("dataset 'file' needs data.text.path: a text file with one sentence per line")
        return self


class DataConfig(_Strict):
    images: ImageDataConfig = ImageDataConfig()
    text: TextDataConfig = TextDataConfig()


class TrainConfig(_Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    num_samples: int = Field(64, gt=0)  # samples written next to the checkpoint
    eval_every: int | None = Field(None, gt=0)  # validation loss every N steps (into loss.csv)
    keep_best: bool = False  # end with the weights of the lowest validation loss (needs eval_every)

    @model_validator(mode="after")
    def _best_needs_eval(self) -> "TrainConfig":
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best needs eval_every: validation loss is only measured every eval_every steps")
        if self.eval_every and self.eval_every % self.log_every:  # the val loss goes into a logged curve row
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of log_every ({self.log_every})")
        return self


class FamilyConfig(_Strict):
    """One ``families.<name>`` block: the family's model config and its training config."""

    model: Any  # validated against the family's own config dataclass, see ``_validate_family``
    train: TrainConfig


class ClassifierConfig(_Strict):
    steps: int = Field(600, gt=0)
    batch_size: int = Field(128, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    feature_dim: int = Field(128, gt=0)


class FeaturesConfig(_Strict):
    extractor: Literal["classifier", "inception"] = "classifier"
    # inception: the FID Inception weights file (weights-inception-2015-12-05-6726825d.pth); null
    # downloads it once into torch's hub cache.
    inception_weights: str | None = None
    inception_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")  # pin the weights file
    classifier: ClassifierConfig = ClassifierConfig()
    # Memorisation searches at most this many training images (seeded choice) for a sample's neighbour.
    max_reference_images: int = Field(20000, gt=0)


class EvaluateConfig(_Strict):
    num_image_samples: int = Field(1000, gt=1, le=10000)  # the k-NN metrics and KID hold n x n matrices
    iw_samples: int = Field(100, gt=0)  # k of the importance-weighted bound
    num_text_samples: int = Field(300, gt=1)
    batch_size: int = Field(250, gt=0)
    k_nearest: int = Field(5, gt=0)              # k of precision / recall / density / coverage
    kid_subsets: int = Field(100, gt=0)
    kid_subset_size: int = Field(500, gt=1)
    bootstrap: int = Field(200, ge=0)            # replicates behind each 95% interval (0: no intervals)
    curve_samples: int = Field(250, gt=5)        # samples per point of the training-time quality curve
    sample_seed: int | None = None               # seed of the sample draws (null: seed)

    @model_validator(mode="after")
    def _k_below_sample_count(self) -> "EvaluateConfig":
        for name in ("num_image_samples", "curve_samples"):
            if self.k_nearest >= getattr(self, name):
                raise ValueError(f"k_nearest ({self.k_nearest}) must be smaller than {name} ({getattr(self, name)})")
        return self


class ReportConfig(_Strict):
    title: str = "Generative model comparison"
    path: str = "reports/report.html"
    # Runs in each family's trend chart: this run and the recorded runs before it (tasks/history.py).
    history_runs: int = Field(10, ge=2, le=100)
    # A metric without a 95% interval (likelihoods, perplexity) regressed when it got worse by more
    # than this fraction of its previous value; metrics with one are held against their interval.
    regression_tolerance: float = Field(0.01, ge=0)
    # A flow run whose report flags a regression ends Failed (a Prefect automation can notify on it).
    fail_on_regression: bool = False


class OrchestrationConfig(_Strict):
    # Stages the Prefect flow runs at once. Each stage is a process using all cores, so
    # more than 1 only pays off with spare cores or GPUs.
    max_parallel_stages: int = Field(1, gt=0)
    # thread: stages run from threads of the flow's process; dask: from Dask workers.
    task_runner: Literal["thread", "dask"] = "thread"
    # dask only: a scheduler address (tcp://host:8786); null starts a local cluster of
    # max_parallel_stages single-threaded worker processes.
    dask_address: str | None = None
    # When `python -m flows.deploy` retrains: a cron expression, in UTC.
    schedule: str = "0 3 * * *"

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, schedule: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError  # what Prefect's cron schedules use

        try:
            CronSim(schedule, datetime(2000, 1, 1))
        except CronSimError as err:
            raise ValueError(f"not a cron expression ({err}); e.g. '0 3 * * *' is every day at 03:00") from None
        return schedule

    @model_validator(mode="after")
    def _address_for_dask(self) -> "OrchestrationConfig":
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is only used with task_runner: dask")
        return self


class PipelineConfig(_Strict):
    seed: int = 0
    # Training seeds: every family is trained once per seed; the first is the headline model, the
    # report adds the mean and spread over all of them. null: [seed].
    seeds: list[int] | None = Field(None, min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True  # CUDA only
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    families: dict[str, FamilyConfig]
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @field_validator("families", mode="before")
    @classmethod
    def _known_families(cls, families: Any) -> Any:
        if not isinstance(families, dict):
            raise ValueError("expected a mapping of family name -> {model, train}")
        if not families:
            raise ValueError("name at least one family")
        for name in families:
            if name not in REGISTRY:
                raise ValueError(f"unknown family {name!r}; known: {', '.join(REGISTRY)}")
        return families

    def family_model_config(self, name: str) -> Any:
        """The family's own (dataclass) model config, validated."""
        return _validate_family(name, self.families[name].model)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"training seeds must differ, got {seeds}")
        return seeds

    @property
    def training_seeds(self) -> list[int]:
        """The training seeds, the headline model's first."""
        return list(self.seeds) if self.seeds else [self.seed]

    @property
    def sample_seed(self) -> int:
        """The seed of evaluation's sample draws."""
        return self.seed if self.evaluate.sample_seed is None else self.evaluate.sample_seed

    def image_families(self) -> list[str]:
        return [n for n in self.families if REGISTRY[n].modality == "image"]

    def text_families(self) -> list[str]:
        return [n for n in self.families if REGISTRY[n].modality == "text"]


def _validate_family(name: str, model_block: Any) -> Any:
    config_class = REGISTRY[name].config_class
    block = {} if model_block is None else model_block
    if isinstance(block, dict):
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValidationError.from_exception_data(config_class.__name__, [
                {"type": "extra_forbidden", "loc": (key,), "input": block[key]} for key in unknown
            ])
    return TypeAdapter(config_class).validate_python(block)


def _format_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        value = item.get("input")
        shown = "" if isinstance(value, dict) or item["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  {key or '<top level>'}: {message}{shown}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params.yaml") -> PipelineConfig:
    """Validate a loaded params mapping; raise ``ParamsError`` naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source} is invalid:\n{_format_error(err)}") from None
    problems = []
    for name in config.families:
        try:
            config.family_model_config(name)
        except ValidationError as err:
            problems.append(_format_error(err, f"families.{name}.model"))
    if problems:
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(problems))
    return config


def load_params(path: str | Path = DEFAULT_PARAMS) -> PipelineConfig:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))
