"""``params.yaml`` -> typed, validated config. The only module that reads the file.

Every error is one line naming the ``params.yaml`` key and the bad value (shown shortened),
and is raised before any step does work. Types are strict: ``"20"`` is not an integer,
``"yes"`` is not a boolean, ``1.5`` is not a step count; floats must be finite; sizes and
counts have upper bounds, so a typo cannot ask for petabytes or run for a century.

The file itself is read defensively: at most ``MAX_PARAMS_BYTES``, UTF-8, no duplicate keys,
nesting at most ``MAX_YAML_DEPTH`` deep and at most ``MAX_YAML_VALUES`` values once YAML
aliases are expanded (an "alias bomb" of a few hundred bytes would otherwise expand to
billions). ``1e-3`` is read as a float (YAML 1.2), not as the string PyYAML makes of it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import reprlib
import typing
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from genai_models.registry import REGISTRY
from tasks.io import InputError, read_regular_file

DEFAULT_PARAMS = Path("params.yaml")
MAX_PARAMS_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000
SEED_LIMIT = 2**32      # numpy and torch seeds; the step streams add small offsets to it
MAX_STEPS = 10**8       # optimizer steps (or evaluation counts) no run should exceed
MAX_BATCH = 2**20


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = _STRICT


class ImageDataConfig(_Strict):
    dataset: Literal["mnist-5k", "mnist", "fashion-mnist", "cifar10", "idx", "folder"] = "mnist-5k"
    # torchvision data sets: the download root (archives already there are used offline);
    # idx: the folder holding the four IDX files; folder: the folder of image files.
    root: str | None = None
    download: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)  # used where the source has no test split
    max_train: int | None = Field(None, gt=0, le=10**9)
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
    min_freq: int = Field(2, ge=1, le=10**9)  # word: rarer words are <unk>; char: rarer characters; bpe: rarer pairs not merged
    max_tokens: int = Field(32, ge=2, le=4096)  # in words: longer sentences are dropped (the same sentences for every tokenizer)
    min_tokens: int = Field(3, ge=1, le=4096)   # in words
    max_train: int | None = Field(None, gt=0, le=10**9)
    max_file_mb: int = Field(256, ge=1, le=65536)  # datasets 'file' and 'jsonl': a larger file is refused (MiB)

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
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}): "
                             "no sentence could be kept")
        return self


class DataConfig(_Strict):
    images: ImageDataConfig = ImageDataConfig()
    text: TextDataConfig = TextDataConfig()


class TrainConfig(_Strict):
    steps: int = Field(gt=0, le=MAX_STEPS)
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(50, gt=0, le=MAX_STEPS)
    checkpoint_every: int = Field(200, gt=0, le=MAX_STEPS)
    num_samples: int = Field(64, gt=0, le=10_000)  # samples written next to the checkpoint
    eval_every: int | None = Field(None, gt=0, le=MAX_STEPS)  # validation loss every N steps (into loss.csv)
    keep_best: bool = False  # end with the weights of the lowest validation loss (needs eval_every)
    # Data-parallel training (PyTorch DDP, launched with torchrun): the number of processes, or
    # "all" (one per visible GPU). batch_size stays the global batch, split evenly between them.
    distributed: int | Literal["all"] | None = None

    @field_validator("distributed")
    @classmethod
    def _positive_processes(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError("must be a number of processes from 1 to 1024, or 'all' (one per GPU), or null")
        return value
    # Learning rate: linear warm-up over warmup_steps, then constant or decayed to 0 at `steps`
    # (genai_models/schedules.py). Applies to every optimizer of the family.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    # EMA of the weights (genai_models/ema.py); when set, the averaged weights are what is validated,
    # sampled, evaluated and saved. null: the last weights.
    ema_decay: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _best_needs_eval(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best needs eval_every: validation loss is only measured every eval_every steps")
        if self.eval_every and self.eval_every % self.log_every:  # the val loss goes into a logged curve row
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of log_every ({self.log_every})")
        if isinstance(self.distributed, int) and self.batch_size % self.distributed:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by distributed "
                             f"({self.distributed} processes): it is the global batch, split evenly")
        return self


class FamilyConfig(_Strict):
    """One ``families.<name>`` block: the family's model config and its training config."""

    model: Any  # validated against the family's own config dataclass, see ``validate_family_config``
    train: TrainConfig


class ClassifierConfig(_Strict):
    steps: int = Field(600, gt=0, le=MAX_STEPS)
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    learning_rate: float = Field(1e-3, gt=0)
    feature_dim: int = Field(128, gt=0, le=65536)


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
    iw_samples: int = Field(100, gt=0, le=100_000)  # k of the importance-weighted bound
    num_text_samples: int = Field(300, gt=1, le=10**6)
    batch_size: int = Field(250, gt=0, le=MAX_BATCH)
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


REPORTS = PurePosixPath("reports")  # the report step's output folder (dvc.yaml: reports/...)


class ReportConfig(_Strict):
    title: str = "Generative model comparison"
    # An .html file under reports/ (metrics.csv is written beside it); outputs stay in the
    # repository's output folders. dvc.yaml's report stage names reports/report.html.
    path: str = "reports/report.html"
    # Runs in each family's trend chart: this run and the recorded runs before it (tasks/history.py).
    history_runs: int = Field(10, ge=2, le=100)
    # A metric without a 95% interval (likelihoods, perplexity) regressed when it got worse by more
    # than this fraction of its previous value; metrics with one are held against their interval.
    regression_tolerance: float = Field(0.01, ge=0)
    # A flow run whose report flags a regression ends Failed (a Prefect automation can notify on it).
    fail_on_regression: bool = False

    @field_validator("path")
    @classmethod
    def _under_reports(cls, path: str) -> str:
        parts = PurePosixPath(path).parts
        if (path.startswith("/") or ".." in parts or len(parts) < 2 or parts[0] != REPORTS.name
                or not parts[-1].endswith(".html") or parts[-1] == ".html" or "\\" in path):
            raise ValueError("must be an .html file under reports/ (e.g. reports/report.html): "
                             "the report step writes only inside the repository's output folders")
        return path


class PerformanceConfig(_Strict):
    """Speed settings of the steps that use torch. They change run time, not what is computed
    (beyond float rounding, and run-to-run bit-exactness where ``deterministic`` is off)."""

    # Image batches and convolution weights in NHWC memory layout (faster convolutions on GPUs).
    # auto: on CUDA for image families, never on the CPU.
    channels_last: bool | Literal["auto"] = "auto"
    # torch.compile of every network the training step runs. reduce-overhead also captures CUDA
    # graphs. Compiling costs seconds to minutes at the start: it pays off on long GPU runs.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    # Deterministic kernels (bit-exact reruns and resumes). auto: on the CPU; on CUDA off, with
    # cuDNN picking the fastest convolution algorithms.
    deterministic: bool | Literal["auto"] = "auto"

    @field_validator("compile", mode="before")
    @classmethod
    def _false_is_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class OrchestrationConfig(_Strict):
    # Stages the Prefect flow runs at once. Each stage is a process using all cores, so
    # more than 1 only pays off with spare cores or GPUs.
    max_parallel_stages: int = Field(1, gt=0, le=1024)
    # GPUs the flow hands out, one to each stage that uses one (features, train, evaluate), pinned
    # through CUDA_VISIBLE_DEVICES: "all" (every visible GPU) or a list of device indices. A
    # stage waits while every GPU is taken; CPU-only stages (prepare, report) run beside them.
    # Ignored when no GPU is visible or device is cpu.
    gpus: Literal["all"] | list[Annotated[int, Field(ge=0, lt=1024)]] = "all"
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

    @field_validator("gpus")
    @classmethod
    def _gpu_indices(cls, gpus: str | list[int]) -> str | list[int]:
        if isinstance(gpus, list):
            if not gpus:
                raise ValueError("name at least one GPU index, or 'all' (for no GPU at all, set device: cpu)")
            if min(gpus) < 0 or len(set(gpus)) != len(gpus):
                raise ValueError("GPU indices must be distinct and >= 0")
        return gpus

    @model_validator(mode="after")
    def _address_for_dask(self) -> "OrchestrationConfig":
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is only used with task_runner: dask")
        return self


class PipelineConfig(_Strict):
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    # Training seeds: every family is trained once per seed; the first is the headline model, the
    # report adds the mean and spread over all of them. null: [seed].
    seeds: list[Annotated[int, Field(ge=0, lt=SEED_LIMIT)]] | None = Field(None, min_length=1, max_length=100)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True  # CUDA only
    performance: PerformanceConfig = PerformanceConfig()
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
        return validate_family_config(name, self.families[name].model)

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


@functools.cache
def _family_fields_model(name: str) -> type[BaseModel]:
    """A strict pydantic model of family ``name``'s config dataclass fields (types and defaults)."""
    config_class = REGISTRY[name].config_class
    hints = typing.get_type_hints(config_class)
    fields = {}
    for item in dataclasses.fields(config_class):
        has_default = item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING
        default = item.default if item.default is not dataclasses.MISSING else ...
        fields[item.name] = (hints[item.name], default if has_default else ...)
    return create_model(config_class.__name__, __config__=_STRICT, **fields)


class FamilyConfigError(ValueError):
    """A family's model config is invalid: ``problems`` is a list of (key, message, value or None)."""

    def __init__(self, problems: list[tuple[str, str, Any]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" if key else message for key, message, _ in problems))
        self.problems = problems


_NO_VALUE = object()


def validate_family_config(name: str, model_block: Any) -> Any:
    """Family ``name``'s config dataclass from a params (or checkpoint) mapping, strictly validated.

    Types are strict and floats finite (the pydantic model of its fields), then the dataclass's
    own ``__post_init__`` checks ranges. Raises ``FamilyConfigError``.
    """
    block = {} if model_block is None else model_block
    try:
        fields = _family_fields_model(name).model_validate(block)
    except ValidationError as err:
        raise FamilyConfigError([(".".join(map(str, item["loc"])), _message(item),
                                  item.get("input", _NO_VALUE) if _shows_input(item) else _NO_VALUE)
                                 for item in err.errors()]) from None
    try:
        return REGISTRY[name].config_class(**dict(fields))
    except (ValueError, TypeError, OverflowError) as err:
        raise FamilyConfigError([("", str(err), _NO_VALUE)]) from None


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` of a value from a params file, cut to about ``limit`` characters.

    Never builds the full repr: a value made of YAML aliases can be astronomically large.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _SHORT.repr(value)
    except (ValueError, RecursionError):
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(item: dict) -> str:
    return "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")


def _shows_input(item: dict) -> bool:
    return not (item["type"] == "missing" or isinstance(item.get("input"), dict))


def _format_problems(problems: list[tuple[str, str, Any]], limit: int = 5) -> str:
    """``key: message (got value)`` for each problem, on one line."""
    shown = [f"{key or '<top level>'}: {_one_line(message, 200)}"
             + ("" if value is _NO_VALUE else f" (got {short_repr(value)})") for key, message, value in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"and {len(problems) - limit} more")
    return "; ".join(shown)


def _format_error(err: ValidationError, prefix: str = "") -> str:
    return _format_problems([
        (".".join(str(p) for p in (prefix, *item["loc"]) if p != ""), _message(item),
         item.get("input", _NO_VALUE) if _shows_input(item) else _NO_VALUE)
        for item in err.errors()])


def parse_params(raw: Any, source: str = "params.yaml") -> PipelineConfig:
    """Validate a loaded params mapping; raise ``ParamsError`` naming every bad key (one line)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source}: {_format_error(err)}") from None
    problems = []
    for name in config.families:
        try:
            validate_family_config(name, config.families[name].model)
        except FamilyConfigError as err:
            problems += [(".".join(p for p in (f"families.{name}.model", key) if p), message, value)
                         for key, message, value in err.problems]
        distributed = config.families[name].train.distributed
        if distributed is not None and not REGISTRY[name].model_class.supports_data_parallel:
            able = ", ".join(n for n, f in REGISTRY.items() if f.model_class.supports_data_parallel)
            problems.append((f"families.{name}.train.distributed",
                             f"{name} does not train data-parallel (families that do: {able}); set it to null",
                             distributed))
    if problems:
        raise ParamsError(f"{source}: {_format_problems(problems)}")
    problems = _image_shape_problems(config)
    if problems:
        raise ParamsError(f"{source}: {_format_problems(problems)}")
    return config


def _image_shape_problems(config: PipelineConfig) -> list[tuple[str, str, Any]]:
    """Image families that cannot be built for the folder data's image shape.

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
            problems.append(("data.images.image_size",
                             f"family {name} cannot use {spec.channels}x{spec.height}x{spec.width} images: {err}",
                             images.image_size))
    return problems


# --- reading the file ----------------------------------------------------------------------------
class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with limits (depth, expanded size), no duplicate keys, YAML 1.2 floats."""

    yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YAMLLimit(f"nested deeper than {MAX_YAML_DEPTH} levels "
                                 f"(line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a "<<" merge may be overridden by the keys beside it
            key, where = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise _YAMLLimit(f"duplicate key {short_repr(key)} at line {where} (first at line {seen[key]}); "
                                 "the later value would silently win")
            seen[key] = where
        return super().construct_mapping(node, deep)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return self.construct_document(node)


# YAML 1.2 also reads 1e-3 and 5E+4 (no dot) as floats; YAML 1.1, and so PyYAML, reads strings.
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


class _YAMLLimit(Exception):
    """The YAML document breaks one of the loader's limits."""


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values the document holds once aliases are expanded; refuse more than MAX_YAML_VALUES.

    An alias is the same node object as its anchor, so sizes are memoized per node: the count
    costs one visit per distinct node however large the expansion.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YAMLLimit(f"an alias refers to the value that contains it (line {node.start_mark.line + 1})")
        active.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_VALUES:
            raise _YAMLLimit(f"YAML aliases expand to more than {MAX_YAML_VALUES:,} values "
                             f"(line {node.start_mark.line + 1}); an alias bomb?")
        return total

    size(root)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_params_file(path: str | Path) -> Any:
    """The YAML document in ``path``, read within the limits above; ``ParamsError`` names the file."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_PARAMS_BYTES)
    except InputError as err:
        if not path.exists():
            raise ParamsError(f"{path}: file not found (run from the repository root)") from None
        raise ParamsError(f"params file {err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}, line {line}: {err.reason})") from None
    loader = None
    try:
        loader = _ParamsLoader(text)  # already reads: refuses control characters such as NUL
        return loader.get_single_data()
    except _YAMLLimit as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {_one_line(err)}") from None
    except (ValueError, RecursionError, OverflowError) as err:  # e.g. an integer of more than 4300 digits
        raise ParamsError(f"{path}: a value cannot be read: {_one_line(err)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_params(path: str | Path = DEFAULT_PARAMS) -> PipelineConfig:
    """Read and validate ``params.yaml``."""
    return parse_params(read_params_file(path), str(path))
