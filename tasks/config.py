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
    dataset: Literal["mnist-5k", "mnist", "fashion-mnist", "cifar10", "idx", "folder"] = "mnist-5k"
    # torchvision data sets: the download root (archives already there are used offline);
    # idx: the folder holding the four IDX files; folder: the folder of image files.
    root: str | None = None
    download: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)  # used where the source has no test split
    max_train: int | None = Field(None, gt=0)
    # none: 8-bit grey levels. dynamic: black/white pixels, drawn as Bernoulli(level / 255) afresh
    # for every training batch; val and test binarized once with the seed (the protocol of the
    # binarized-MNIST likelihood literature). Values stay uint8 (0 or 255).
    binarize: Literal["none", "dynamic"] = "none"
    # folder only (see FOLDER_ONLY): every image is center-cropped to a square, then resized to
    # image_size x image_size with the Pillow filter resize_filter, in 1 (grey) or 3 (RGB) channels.
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    resize_filter: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = "bicubic"
    skip_unreadable: bool = False  # skip (and list in the manifest) files Pillow cannot decode

    @model_validator(mode="after")
    def _root_for_idx(self) -> "ImageDataConfig":
        if self.dataset == "idx" and not self.root:
            raise ValueError("dataset 'idx' needs data.images.root: the folder with the IDX files")
        if self.dataset == "folder":
            if not self.root:
                raise ValueError("dataset 'folder' needs data.images.root: the folder of image files "
                                 "(class sub-folders for labels, or a flat folder)")
            if self.image_size is None:
                raise ValueError("dataset 'folder' needs data.images.image_size: the side of the square "
                                 "images after center-crop and resize (e.g. 32)")
            if self.image_size % 4:
                raise ValueError(f"image_size must be divisible by 4: the image families and the feature "
                                 f"classifier halve the image twice (got {self.image_size})")
        else:
            given = sorted(FOLDER_ONLY & self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)}: only used with dataset 'folder' (dataset is {self.dataset!r})")
        return self


# Keys of data.images that only dataset 'folder' reads (refused, and left out of manifests, otherwise).
FOLDER_ONLY = frozenset({"image_size", "channels", "resize_filter", "skip_unreadable"})


class TextDataConfig(_Strict):
    dataset: Literal["lee-news", "file", "jsonl"] = "lee-news"
    path: str | None = None  # file: one sentence per line; jsonl: one JSON object per line
    text_field: str | None = Field(None, min_length=1)  # jsonl: the field holding the text (default "text")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    # word: one token per word seen min_freq times in train, others <unk>; char: one per character;
    # bpe: byte-pair-encoding subwords learnt on train (Hugging Face tokenizers), vocab_size ids.
    tokenizer: Literal["word", "char", "bpe"] = "bpe"
    vocab_size: int = Field(2000, ge=16, le=1_000_000)  # bpe only
    min_freq: int = Field(2, ge=1)  # word: rarer words are <unk>; char: rarer characters; bpe: rarer pairs not merged
    max_tokens: int = Field(32, ge=2)  # in words: longer sentences are dropped (the same sentences for every tokenizer)
    min_tokens: int = Field(3, ge=1)   # in words
    max_train: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _path_for_file(self) -> "TextDataConfig":
        if self.dataset in ("file", "jsonl") and not self.path:
            what = "a text file with one sentence per line" if self.dataset == "file" else \
                "a JSON Lines file, one object per line with the text in text_field"
            raise ValueError(f"dataset {self.dataset!r} needs data.text.path: {what}")
        if self.text_field is not None and self.dataset != "jsonl":
            raise ValueError(f"text_field: only used with dataset 'jsonl' (dataset is {self.dataset!r})")
        if self.tokenizer != "bpe" and "vocab_size" in self.model_fields_set:
            raise ValueError(f"vocab_size: only used with tokenizer 'bpe' (tokenizer is {self.tokenizer!r}; "
                             f"word and char vocabularies are sized by min_freq)")
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
    inception_weights: str | None = None  # torchvision InceptionV3 IMAGENET1K_V1 state dict (.pth)
    classifier: ClassifierConfig = ClassifierConfig()

    @model_validator(mode="after")
    def _weights_for_inception(self) -> "FeaturesConfig":
        if self.extractor == "inception" and not self.inception_weights:
            raise ValueError("extractor 'inception' needs features.inception_weights: a local .pth file")
        return self


class EvaluateConfig(_Strict):
    num_image_samples: int = Field(1000, gt=1)
    iw_samples: int = Field(100, gt=0)  # k of the importance-weighted bound
    num_text_samples: int = Field(300, gt=1)
    batch_size: int = Field(250, gt=0)


class ReportConfig(_Strict):
    title: str = "Generative model comparison"
    path: str = "reports/report.html"


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
    problems = _image_shape_problems(config)
    if problems:
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(problems))
    return config


def _image_shape_problems(config: PipelineConfig) -> list[str]:
    """Image families that cannot be built for the folder data's image shape, one line each.

    Known before any data is read (``image_size`` and ``channels``); each family is built on
    the ``meta`` device, which runs its own shape checks without allocating any memory.
    """
    images = config.data.images
    if images.dataset != "folder" or images.image_size is None:
        return []
    import torch

    from genai_models.base import ImageSpec

    spec = ImageSpec(images.channels, images.image_size, images.image_size)
    problems = []
    for name in config.image_families():
        try:
            with torch.device("meta"):
                REGISTRY[name].build(config.family_model_config(name), spec)
        except ValueError as err:
            problems.append(f"  data.images.image_size: family {name} cannot use {spec.channels}x{spec.height}"
                            f"x{spec.width} images: {err} (got {images.image_size})")
    return problems


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
