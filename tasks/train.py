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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genai_models.base import DataSpec, GenerativeModel, Precision, TrainSettings, config_to_dict
from genai_models.ema import ModelEMA
from genai_models.schedules import lr_schedulers
from genai_models.registry import get_family
from tasks import data, paths
from tasks.checkpoints import (
    CheckpointError, checksum_path, load_torch, model_checkpoint, recover_interrupted_save, save_torch,
)
from tasks.config import PipelineConfig, TrainConfig
from tasks.io import atomic_write_json, replace_directory, sha256_file
from tasks.quality_curve import QualityCurve
from tasks.runtime import StepClock, device_name, format_duration, resolve_device, seed_everything
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
        vocab = data.load_vocab(folder)
        spec = data.text_spec(folder, vocab)
        split = lambda name: data.encode_sentences(data.load_text(folder, name), vocab, spec.max_len)  # noqa: E731
    binarized = modality == "image" and data.is_dynamically_binarized(folder)
    return TrainingData(split("train"), split("val"), spec, checksum, binarized)


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: a fresh seeded permutation per epoch, last partial batch dropped.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    batch_size = min(batch_size, num_examples)
    per_epoch = num_examples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def _settings(train: TrainConfig) -> TrainSettings:
    return TrainSettings(train.learning_rate, train.weight_decay, (train.beta1, train.beta2), train.grad_clip)


class Trainer:
    """Holds what one family's training run needs; ``fit`` runs it, resuming where it stopped."""

    def __init__(self, config: PipelineConfig, family: str, seed: int | None = None) -> None:
        self.family = family
        self.config = config
        self.seed = config.training_seeds[0] if seed is None else seed
        self.train_config = config.families[family].train
        self.device = resolve_device(config.device)
        spec = get_family(family)
        self.data = load_training_data(spec.modality)
        seed_everything(self.seed)
        self.model: GenerativeModel = spec.build(config.family_model_config(family), self.data.spec).to(self.device)
        self.settings = _settings(self.train_config)
        self.optimizers = self.model.configure_optimizers(self.settings)
        cfg = self.train_config
        self.schedulers = lr_schedulers(self.optimizers, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.precision = Precision(self.device, config.mixed_precision)
        self.state_dir = paths.RUN_STATE / family / f"seed-{self.seed}"
        recover_interrupted_save(self.state_dir / "state.pt")  # a previous run may have been killed mid-save
        self.fingerprint = self._fingerprint()
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.best: dict | None = None  # {"step", "val_loss", "weights"} when keep_best
        # Image families: a cheap FID / precision / recall of samples at every validation point
        # (loaded at the first one: it needs the features step's output).
        self.quality: QualityCurve | None = None
        self.quality_seconds = 0.0  # time spent measuring it (not training time)

    def _fingerprint(self) -> str:
        """What a resumable state must match: family, configs, seed, data."""
        blob = json.dumps({
            "family": self.family, "model": config_to_dict(self.model.config),
            "train": self.train_config.model_dump(), "seed": self.seed, "data": self.data.checksum,
            "device": self.device.type, "precision": self.precision.name,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

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
    def fit(self) -> None:
        cfg, total = self.train_config, self.train_config.steps
        self.model.train()
        window_start, window_examples = time.perf_counter(), 0
        while self.step < total:
            tick = time.perf_counter()
            index = batch_indices(self.step, self.data.train.shape[0], cfg.batch_size, self.seed)
            batch = self.data.train[index].to(self.device, non_blocking=True)
            if self.data.binarize:  # seeded by the step, like the batch order: resuming sees the same pixels
                noise = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step + 7)
                batch = data.binarize(batch, noise)
            terms = self.model.training_step(batch, self.optimizers, self.precision, self.settings)
            self._after_step()
            values = {name: float(value) for name, value in terms.items()}
            self._check_finite(values)
            self.step += 1
            self.train_seconds += time.perf_counter() - tick
            window_examples += batch.shape[0]
            if self.step % cfg.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                rate = window_examples / max(elapsed, 1e-9)
                self.curve.append({"step": self.step, **values, "samples_per_s": round(rate, 1),
                                   "train_seconds": round(self.train_seconds, 3)})
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._validate_and_track_best()
                eta = (total - self.step) * cfg.batch_size / max(rate, 1e-9)
                log.info("%s step %d/%d  %s  | %.0f samples/s | ETA %s", self.family, self.step, total,
                         "  ".join(f"{k} {v:.4g}" for k, v in values.items()), rate, format_duration(eta))
                window_start, window_examples = time.perf_counter(), 0
            if self.step % cfg.checkpoint_every == 0 and self.step < total:
                self.save_state()

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

    def _check_finite(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"{self.family}: loss term {name!r} is {value} at step {self.step + 1}; "
                    f"the last good state is kept in {self.state_dir / 'state.pt'} (if any)"
                )

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean ``loss`` over the validation split, in eval mode.

        Stochastic objectives (VAE, GAN) see fixed noise; the training random stream is
        left untouched, so validating does not change what training does next.
        """
        self.model.eval()
        batch_size, total, count = self.train_config.batch_size, 0.0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for start in range(0, self.data.val.shape[0], batch_size):
                batch = self.data.val[start:start + batch_size].to(self.device)
                total += float(self.model.loss(batch)["loss"]) * batch.shape[0]
                count += batch.shape[0]
        self.model.train()
        return total / max(count, 1)


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
        "precision": trainer.precision.name, "steps": cfg.steps,
        "train_seconds": round(trainer.train_seconds, 3),
        "train_samples_per_s": round(examples / max(trainer.train_seconds, 1e-9), 1),
        "final_train_loss": trainer.curve[-1]["loss"] if trainer.curve else None,
        "val_loss": val_loss, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "torch": torch.__version__, "best_step": trainer.best["step"] if trainer.best else None,
        "quality_curve_seconds": round(trainer.quality_seconds, 3),
    })


def train_family(config: PipelineConfig, family: str) -> Path:
    """Train ``family`` once per training seed and write ``models/<family>/``; returns that folder.

    The headline (first) seed's model is ``models/<family>/model.pt``, the others'
    ``models/<family>/seeds/<seed>/model.pt``. The folder is replaced only when every seed is done;
    until then each finished seed keeps its resumable state, so a failure loses no finished seed.
    """
    clock = StepClock(f"train {family}")
    seeds = config.training_seeds
    out = paths.model_dir(family)
    finished = []
    with replace_directory(out) as tmp:
        for seed in seeds:
            trainer = Trainer(config, family, seed)
            parameters = sum(p.numel() for p in trainer.model.parameters())
            log.info("%s (seed %d of %s): %d parameters on %s (%s), %d training examples", family, seed, seeds,
                     parameters, device_name(trainer.device), trainer.precision.name, trainer.data.train.shape[0])
            trainer.try_resume()
            trainer.fit()
            if len(seeds) > 1:
                trainer.save_state()  # finished: a later seed's failure must not cost this one
            trainer.finish()
            val_loss = trainer.validation_loss()
            log.info("%s (seed %d): validation loss %.4g", family, seed, val_loss)
            write_model_outputs(trainer, tmp / seed_model_dir(family, seed, seeds).relative_to(out), val_loss, clock)
            finished.append(trainer)
    # The resumable states are only useful while the run is unfinished.
    for trainer in finished:
        for path in (trainer.state_dir / "state.pt", checksum_path(trainer.state_dir / "state.pt")):
            path.unlink(missing_ok=True)
    return out
