"""Training step: one family, from prepared data to a checkpoint, a loss curve and samples.

setup -> fit (resumable) -> validate -> save. The loop only uses the ``GenerativeModel``
interface, so it never asks which family it is training.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genai_models.base import DataSpec, GenerativeModel, Precision, TrainSettings, config_to_dict
from genai_models.ema import ModelEMA
from genai_models.schedules import lr_schedulers
from genai_models.registry import get_family
from tasks import data, distributed, paths
from tasks.checkpoints import (
    CheckpointError, check_model_size, checksum_path, load_torch, model_checkpoint, recover_interrupted_save, save_torch,
)
from tasks.config import ParamsError, PipelineConfig, TrainConfig
from tasks.distributed import DataParallel
from tasks.io import atomic_write_json, check_writable, exclusive_lock, replace_directory, sha256_file
from tasks.quality_curve import QualityCurve
from tasks.runtime import StepClock, deterministic_on, device_name, format_duration, resolve_device, seed_everything
from tasks.samples import seed_model_dir, write_samples

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


@dataclass
class TrainingData:
    train: torch.Tensor  # uint8 images (N, C, H, W) or token ids (N, L)
    val: torch.Tensor
    spec: DataSpec
    checksum: str        # sha256 of the prepared data's manifest
    binarize: bool = False  # draw every training batch's pixels as Bernoulli(level / 255)


def load_training_data(modality: str) -> TrainingData:
    """The prepared train/val tensors of a modality."""
    folder = paths.data_dir(modality)
    checksum = sha256_file(folder / "manifest.json")
    if modality == "image":
        spec = data.image_spec(folder)
        split = lambda name: torch.from_numpy(data.load_images(folder, name)[0])  # noqa: E731
    else:
        tokenizer = data.load_tokenizer(folder)
        spec = data.text_spec(folder, tokenizer)
        split = lambda name: data.encode_sentences(data.load_text(folder, name), tokenizer, spec.max_len)  # noqa: E731
    binarized = modality == "image" and data.is_dynamically_binarized(folder)
    return TrainingData(split("train"), split("val"), spec, checksum, binarized)


def prepared_spec(modality: str) -> DataSpec:
    """The data spec of a modality's prepared data, read from its manifest (and vocabulary) only."""
    folder = paths.data_dir(modality)
    return data.image_spec(folder) if modality == "image" else data.text_spec(folder, data.load_vocab(folder))


def check_can_train(config: PipelineConfig, family: str) -> None:
    """Before any training: the prepared data is there, the model fits, and the outputs can be written.

    Raises ``FileNotFoundError`` (no prepared data), ``ParamsError`` (the model is too large for this
    machine, or the family refuses its config for this data) or ``OutputError``.
    """
    spec = prepared_spec(get_family(family).modality)
    device = resolve_device(config.device)
    try:
        check_model_size(family, config.family_model_config(family), spec, device, training=True)
    except ValueError as err:  # ModelTooLarge, or e.g. image sides the family cannot handle
        raise ParamsError(f"families.{family}.model: {err}") from None
    check_writable(paths.model_dir(family).parent)
    check_writable(paths.RUN_STATE / family)
def epoch_permutation(epoch: int, num_examples: int, seed: int) -> torch.Tensor:
    """The seeded order of the training examples in ``epoch`` (on the CPU)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: a fresh seeded permutation per epoch, last partial batch dropped.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    batch_size = min(batch_size, num_examples)
    epoch, position = divmod(step, num_examples // batch_size)
    return epoch_permutation(epoch, num_examples, seed)[position * batch_size:(position + 1) * batch_size]


class BatchOrder:
    """``batch_indices`` for consecutive steps, with each epoch's permutation made once and kept on ``device``.

    Drawing a permutation of the whole training set every step costs more than a small model's
    GPU step; this makes it once per epoch and slices it on the device (no host round trip).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.num_examples, self.batch_size, self.seed, self.device = num_examples, min(batch_size, num_examples), seed, device
        self.per_epoch = num_examples // self.batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        """(batch_size,) indices of the batch at ``step``, on ``device``; equal to ``batch_indices``."""
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_permutation(epoch, self.num_examples, self.seed).to(self.device)
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def _settings(train: TrainConfig) -> TrainSettings:
    return TrainSettings(train.learning_rate, train.weight_decay, (train.beta1, train.beta2), train.grad_clip)


class Trainer:
    """Holds what one family's training run needs; ``fit`` runs it, resuming where it stopped.

    The per-step path (``fit``'s loop) never reads a value back to the host: the loss terms of
    each step stay on the device until the end of a *window* (every ``log_every`` and
    ``checkpoint_every`` steps, and the last step), where ``_close_window`` reads them all at
    once, checks they are finite, logs, validates and checkpoints.

    With ``parallel`` active (several processes, see ``tasks.distributed``) each process trains
    on its share of every global batch through DDP; only the main process validates and saves.
    """

    def __init__(self, config: PipelineConfig, family: str, seed: int | None = None, data: TrainingData | None = None,
                 state_dir: Path | None = None, parallel: DataParallel = DataParallel()) -> None:
        """``seed``: the training seed (default: the first of ``training_seeds``); ``data``: the prepared
        data of the family's modality unless given; ``state_dir``: where the resumable state lives
        (default ``.runs/<family>/seed-<seed>``); ``parallel``: this process's rank among the
        data-parallel processes (default: the only one)."""
        self.family, self.config, self.parallel = family, config, parallel
        self.seed = config.training_seeds[0] if seed is None else seed
        self.train_config = config.families[family].train
        self.device = parallel.device(resolve_device(config.device))
        family_spec = get_family(family)
        self.data = data if data is not None else load_training_data(family_spec.modality)
        check_model_size(family, config.family_model_config(family), self.data.spec, self.device, training=True)
        # The training split lives on the device for the whole run: one copy, not one per step.
        self.train_examples = self.data.train.to(self.device)
        self.batch_order = BatchOrder(self.data.train.shape[0], self.train_config.batch_size, self.seed, self.device)
        self._val_examples: torch.Tensor | None = None
        seed_everything(self.seed, deterministic_on(config.performance.deterministic, self.device))
        self.channels_last = channels_last_on(config.performance.channels_last, self.device, family_spec.modality)
        self.model: GenerativeModel = self._build_model()
        self.settings = _settings(self.train_config)
        self.optimizers = self.model.configure_optimizers(self.settings)
        cfg = self.train_config
        self.schedulers = lr_schedulers(self.optimizers, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.precision = Precision(self.device, config.mixed_precision)
        self.loss_fn = parallel.wrap_loss(self.model)  # DDP across processes; None: the model's own loss
        self.state_dir = state_dir if state_dir is not None else paths.RUN_STATE / family / f"seed-{self.seed}"
        if parallel.is_main:
            recover_interrupted_save(self.state_dir / "state.pt")  # a previous run may have been killed mid-save
        parallel.barrier()
        self.fingerprint = self._fingerprint()
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.best: dict | None = None  # {"step", "val_loss", "weights"} when keep_best
        self._window: list[dict[str, torch.Tensor]] = []  # loss terms of the steps since the last window end
        self._window_start = time.perf_counter()
        # Image families: a cheap FID / precision / recall of samples at every validation point
        # (loaded at the first one: it needs the features step's output).
        self.quality: QualityCurve | None = None
        self.quality_seconds = 0.0  # time spent measuring it (not training time)
        self.after_fit_seconds = 0.0  # the model's own fit after the loop (``GenerativeModel.after_fit``)

    def _build_model(self) -> GenerativeModel:
        """The family's model from the seed, on the device, in the memory layout and compiled as configured."""
        model = get_family(self.family).build(self.config.family_model_config(self.family), self.data.spec)
        model = model.to(self.device)
        if self.parallel.active:
            self._check_data_parallel(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.config.performance.compile != "off":
            compile_networks(model, self.config.performance.compile)
        return model

    def _check_data_parallel(self, model: GenerativeModel) -> None:
        world, batch = self.parallel.world_size, self.batch_order.batch_size
        if not model.supports_data_parallel:
            raise ParamsError(f"families.{self.family}.train.distributed: {self.family} does not train "
                              f"data-parallel, but {world} processes were started")
        if batch % world:
            raise ParamsError(f"families.{self.family}.train.batch_size: the global batch ({batch}) must be "
                              f"divisible by the {world} data-parallel processes")

    def _fingerprint(self) -> str:
        """What a resumable state must match: family, configs, seed, data, device, precision, processes."""
        blob = {
            "family": self.family, "model": config_to_dict(self.model.config),
            "train": self.train_config.model_dump(exclude={"distributed"}), "seed": self.seed,
            "data": self.data.checksum, "device": self.device.type, "precision": self.precision.name,
        }
        if self.parallel.active:  # the random draws depend on the number of processes
            blob["processes"] = self.parallel.world_size
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    # --- resumable state -------------------------------------------------------------
    def save_state(self) -> None:
        save_torch({
            "fingerprint": self.fingerprint, "step": self.step, "curve": self.curve,
            "train_seconds": self.train_seconds, "quality_seconds": self.quality_seconds, "best": self.best,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.precision.scaler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }, self.state_dir / "state.pt")

    def try_resume(self) -> None:
        path = self.state_dir / "state.pt"
        if not path.exists():
            return
        try:
            state = load_torch(path, map_location=self.device)
        except CheckpointError as err:
            log.warning("%s: not resuming, training from step 0: %s", self.family, err)
            return
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s: ignoring saved state in %s (made with other config or data)", self.family, path)
            return
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.precision.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"].cpu())
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step, self.curve, self.train_seconds = state["step"], state["curve"], state["train_seconds"]
        self.best = state["best"]
        self.quality_seconds = state.get("quality_seconds", 0.0)
        log.info("%s: resumed from step %d (%s)", self.family, self.step, path)

    # --- the loop --------------------------------------------------------------------
    def fit(self, until: int | None = None) -> None:
        """Train from ``self.step`` up to step ``until`` (default: ``train.steps``)."""
        total = self.train_config.steps if until is None else until
        self.model.train()
        step_options = {} if self.loss_fn is None else {"loss_fn": self.loss_fn}
        self._window, self._window_start = [], time.perf_counter()
        while self.step < total:
            if self.parallel.active:
                torch.manual_seed(self.parallel.step_seed(self.seed, self.step))
            terms = self.model.training_step(self.next_batch(), self.optimizers, self.precision, self.settings,
                                             **step_options)
            self._after_step()  # device-side work only (LR schedule, EMA): no value read back to the host
            self._window.append(terms)
            self.step += 1
            if self._window_ends(total):
                self._close_window(total)

    def next_batch(self) -> torch.Tensor:
        """This process's share of the training batch of ``self.step``, on the device."""
        batch = self.train_examples[self.batch_order(self.step)]  # the global batch
        if self.data.binarize:  # seeded by the step, like the batch order: resuming sees the same pixels
            noise = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.step + 7)
            batch = data.binarize(batch, noise)
        batch = self.parallel.shard(batch)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _window_ends(self, total: int) -> bool:
        cfg = self.train_config
        return self.step == total or self.step % cfg.log_every == 0 or self.step % cfg.checkpoint_every == 0

    def _close_window(self, total: int) -> None:
        """The host side of the steps since the last window: finite check, log, validate, checkpoint."""
        cfg = self.train_config
        steps, values = len(self._window), self._read_window()  # the window's one host synchronisation
        elapsed = time.perf_counter() - self._window_start
        self.train_seconds += elapsed
        if self.step % cfg.log_every == 0 or self.step == total:
            rate = steps * self.batch_order.batch_size / max(elapsed, 1e-9)
            self.curve.append({"step": self.step, **values, "samples_per_s": round(rate, 1),
                               "train_seconds": round(self.train_seconds, 3)})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.parallel.is_main:
                self._validate_and_track_best()
            eta = (cfg.steps - self.step) * self.batch_order.batch_size / max(rate, 1e-9)
            log.info("%s step %d/%d  %s  | %.0f samples/s | ETA %s", self.family, self.step, cfg.steps,
                     "  ".join(f"{k} {v:.4g}" for k, v in values.items()), rate, format_duration(eta))
        if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps and self.parallel.is_main:
            self.save_state()  # only ever after a finite window: the saved state is a good one
        self._window, self._window_start = [], time.perf_counter()

    def _read_window(self) -> dict[str, float]:
        """Every loss term of the window's steps to the host at once; raise if any is not finite.

        Returns the last step's terms (what the curve records).
        """
        names = list(self._window[-1])
        values = torch.stack([torch.stack([terms[name].float() for name in names]) for terms in self._window])
        values = self.parallel.mean(values).cpu()  # (steps, terms), averaged over the processes
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            row, column = bad[0].tolist()
            raise TrainingDiverged(
                f"{self.family}: loss term {names[column]!r} is {float(values[row, column])} at step "
                f"{self.step - len(self._window) + row + 1}; the last good state is kept in "
                f"{self.state_dir / 'state.pt'} (if any)"
            )
        return dict(zip(names, values[-1].tolist()))

    def _after_step(self) -> None:
        """Per-step additions after the optimizer steps: the learning-rate schedule, the EMA.

        Both only write on the device (or into Python floats): no value is read back to the host.
        """
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema:
            self.ema.update(self.model)

    def weights_in_use(self) -> contextlib.AbstractContextManager:
        """Inside the block the model holds the weights that would be saved now (the EMA, when on)."""
        return self.ema.swapped_in(self.model) if self.ema else contextlib.nullcontext()

    def _validate_and_track_best(self) -> None:
        """Validation loss and image families' sample quality (of the weights in use: the EMA when on)
        into the curve; with keep_best, remember the best weights so far."""
        with self.weights_in_use():
            val_loss = self.validation_loss()
            self.curve[-1]["val_loss"] = round(val_loss, 6)
            log.info("%s step %d  validation loss %.4g", self.family, self.step, val_loss)
            if self.model.modality == "image":
                started = time.perf_counter()
                self.quality = self.quality or QualityCurve(self.config, self.device)
                quality = self.quality.measure(self.model)
                self.quality_seconds += time.perf_counter() - started
                self.curve[-1].update({name: round(value, 6) for name, value in quality.items()})
                log.info("%s step %d  %s", self.family, self.step,
                         "  ".join(f"{name} {value:.4g}" for name, value in quality.items()))
            if self.train_config.keep_best and (self.best is None or val_loss < self.best["val_loss"]):
                weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.best = {"step": self.step, "val_loss": val_loss, "weights": weights}

    def finish(self) -> None:
        """The weights to save: the EMA when on, then (keep_best) the best validated ones."""
        if self.ema:
            self.ema.copy_to(self.model)
            log.info("%s: using the EMA of the weights (decay %g)", self.family, self.ema.decay)
        self.restore_best()

    def restore_best(self) -> None:
        """With keep_best: load the weights of the lowest validation loss seen."""
        if self.train_config.keep_best and self.best is not None:
            self.model.load_state_dict(self.best["weights"])
            log.info("%s: keeping the weights of step %d (validation loss %.4g)", self.family,
                     self.best["step"], self.best["val_loss"])

    def after_fit(self) -> float:
        """The model's own fit after the loop (``GenerativeModel.after_fit``) on the whole training split;
        returns its seconds. Seeded; with dynamic binarization the split is binarized once first."""
        start = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        train = data.binarize(self.data.train, generator) if self.data.binarize else self.data.train
        self.model.after_fit(train, generator)
        return time.perf_counter() - start

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean ``loss`` over the validation split, in eval mode.

        Stochastic objectives (VAE, GAN) see fixed noise; the training random stream is
        left untouched, so validating does not change what training does next. The split
        is copied to the device once; the sum stays there until the end.
        """
        if self._val_examples is None:
            self._val_examples = self.data.val.to(self.device)
        self.model.eval()
        batch_size, count = self.train_config.batch_size, self._val_examples.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for start in range(0, count, batch_size):
                batch = self._val_examples[start:start + batch_size]
                total += self.model.loss(batch)["loss"].double() * batch.shape[0]
        self.model.train()
        return float(total) / max(count, 1)


def channels_last_on(setting: bool | str, device: torch.device, modality: str) -> bool:
    """``performance.channels_last`` resolved: auto means image families on CUDA."""
    return device.type == "cuda" and modality == "image" if setting == "auto" else bool(setting)


def compile_networks(model: torch.nn.Module, mode: str) -> None:
    """``torch.compile`` (in place) every network of ``model``: its direct children, and the members of
    its module lists. Works for every family, including those that own their training step."""
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            compile_networks(child, mode)
        else:
            child.compile(mode=mode)


def write_curve(curve: list[dict[str, float]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in curve for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    path.write_text(buffer.getvalue())


def write_model_outputs(trainer: Trainer, out: Path, val_loss: float, clock: StepClock) -> None:
    """One trained model's folder: checkpoint, loss/quality curve, samples, config and summary."""
    out.mkdir(parents=True, exist_ok=True)
    cfg, family = trainer.train_config, trainer.family
    save_torch(model_checkpoint(trainer.model, family), out / "model.pt")
    write_curve(trainer.curve, out / "loss.csv")
    write_samples(trainer.model, cfg.num_samples, trainer.seed, out)
    atomic_write_json(out / "config.json", {
        "family": family, "seed": trainer.seed, "model": config_to_dict(trainer.model.config),
        "train": cfg.model_dump(), "data_checksum": trainer.data.checksum,
    })
    examples = cfg.steps * min(cfg.batch_size, trainer.data.train.shape[0])
    atomic_write_json(out / "summary.json", {
        **clock.record(), "family": family, "seed": trainer.seed, "device": device_name(trainer.device),
        "precision": trainer.precision.name, "steps": cfg.steps, "processes": trainer.parallel.world_size,
        "train_seconds": round(trainer.train_seconds, 3), "after_fit_seconds": round(trainer.after_fit_seconds, 3),
        "train_samples_per_s": round(examples / max(trainer.train_seconds, 1e-9), 1),
        "final_train_loss": trainer.curve[-1]["loss"] if trainer.curve else None,
        "val_loss": val_loss, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "model_summary": trainer.model.describe(),
        "torch": torch.__version__, "best_step": trainer.best["step"] if trainer.best else None,
        "quality_curve_seconds": round(trainer.quality_seconds, 3),
    })


def fit_seed(config: PipelineConfig, family: str, seed: int, parallel: DataParallel = DataParallel()) -> Trainer:
    """Set up and fit one training seed of ``family``, resuming where an earlier run stopped."""
    trainer = Trainer(config, family, seed, parallel=parallel)
    log.info("%s (seed %d of %s): %d parameters on %s (%s), %d training examples%s", family, seed,
             config.training_seeds, sum(p.numel() for p in trainer.model.parameters()), device_name(trainer.device),
             trainer.precision.name, trainer.data.train.shape[0],
             f", data-parallel on {parallel.world_size} processes" if parallel.active else "")
    trainer.try_resume()
    trainer.fit()
    return trainer


def train_family(config: PipelineConfig, family: str) -> Path | None:
    """Train ``family`` once per training seed and write ``models/<family>/``; returns that folder.

    The headline (first) seed's model is ``models/<family>/model.pt``, the others'
    ``models/<family>/seeds/<seed>/model.pt``. The folder is replaced only when every seed is done;
    until then each finished seed keeps its resumable state, so a failure loses no finished seed.

    One training of a family at a time per checkout: a second one raises ``Busy`` naming the
    first, instead of sharing (and resuming from) its resumable state. Outputs are checked
    writable before the first step, and each finished state is saved before the final write,
    so a write that fails anyway loses no training: the next run resumes at the last step.

    Data-parallel (``train.distributed``, under torchrun): every process fits, only the main one
    (rank 0, which alone takes the lock) saves; the others return None.
    """
    if not distributed.environment().is_main:  # rank 0 holds the lock for the whole data-parallel run
        return _train_family(config, family)
    with exclusive_lock(paths.RUN_STATE / family / "train.lock", f"training {family} in this checkout"):
        check_writable(paths.model_dir(family).parent)
        return _train_family(config, family)


def _train_family(config: PipelineConfig, family: str) -> Path | None:
    clock = StepClock(f"train {family}")
    seeds = config.training_seeds
    with distributed.process_group(resolve_device(config.device)) as parallel:
        if not parallel.is_main:
            for seed in seeds:
                fit_seed(config, family, seed, parallel)
            return None
        finished: list[tuple[Trainer, float]] = []
        for seed in seeds:
            trainer = fit_seed(config, family, seed, parallel)
            trainer.save_state()  # kept until the outputs are in place: a failed write or seed loses no training
            trainer.finish()
            trainer.after_fit_seconds = trainer.after_fit()
            val_loss = trainer.validation_loss()
            log.info("%s (seed %d): validation loss %.4g", family, seed, val_loss)
            finished.append((trainer, val_loss))
        out = paths.model_dir(family)
        with replace_directory(out) as tmp:
            for trainer, val_loss in finished:
                write_model_outputs(trainer, tmp / seed_model_dir(family, trainer.seed, seeds).relative_to(out),
                                    val_loss, clock)
    # The resumable states are only useful while the run is unfinished.
    for trainer, _ in finished:
        for path in (trainer.state_dir / "state.pt", checksum_path(trainer.state_dir / "state.pt")):
            path.unlink(missing_ok=True)
    return out
