"""Training step: one family, from prepared data to a checkpoint, a loss curve and samples.

setup -> fit (resumable) -> validate -> save. The loop only uses the ``GenerativeModel``
interface, so it never asks which family it is training.
"""

from __future__ import annotations

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
from PIL import Image

from genai_models.base import DataSpec, GenerativeModel, Precision, TrainSettings, config_to_dict
from genai_models.registry import get_family
from tasks import data, paths
from tasks.checkpoints import (
    CheckpointError, checksum_path, load_torch, model_checkpoint, recover_interrupted_save, save_torch,
)
from tasks.config import PipelineConfig, TrainConfig
from tasks.io import atomic_write_json, replace_directory, sha256_file
from tasks.runtime import StepClock, device_name, format_duration, resolve_device, seed_everything

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

    def __init__(self, config: PipelineConfig, family: str) -> None:
        self.family = family
        self.config = config
        self.train_config = config.families[family].train
        self.device = resolve_device(config.device)
        spec = get_family(family)
        self.data = load_training_data(spec.modality)
        seed_everything(config.seed)
        self.model: GenerativeModel = spec.build(config.family_model_config(family), self.data.spec).to(self.device)
        self.settings = _settings(self.train_config)
        self.optimizers = self.model.configure_optimizers(self.settings)
        self.precision = Precision(self.device, config.mixed_precision)
        self.state_dir = paths.RUN_STATE / family
        recover_interrupted_save(self.state_dir / "state.pt")  # a previous run may have been killed mid-save
        self.fingerprint = self._fingerprint()
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.best: dict | None = None  # {"step", "val_loss", "weights"} when keep_best

    def _fingerprint(self) -> str:
        """What a resumable state must match: family, configs, seed, data."""
        blob = json.dumps({
            "family": self.family, "model": config_to_dict(self.model.config),
            "train": self.train_config.model_dump(), "seed": self.config.seed, "data": self.data.checksum,
            "device": self.device.type, "precision": self.precision.name,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    # --- resumable state -------------------------------------------------------------
    def save_state(self) -> None:
        save_torch({
            "fingerprint": self.fingerprint, "step": self.step, "curve": self.curve,
            "train_seconds": self.train_seconds, "best": self.best,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
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
        self.precision.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"].cpu())
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step, self.curve, self.train_seconds = state["step"], state["curve"], state["train_seconds"]
        self.best = state["best"]
        log.info("%s: resumed from step %d (%s)", self.family, self.step, path)

    # --- the loop --------------------------------------------------------------------
    def fit(self) -> None:
        cfg, total = self.train_config, self.train_config.steps
        self.model.train()
        window_start, window_examples = time.perf_counter(), 0
        while self.step < total:
            tick = time.perf_counter()
            index = batch_indices(self.step, self.data.train.shape[0], cfg.batch_size, self.config.seed)
            batch = self.data.train[index].to(self.device, non_blocking=True)
            if self.data.binarize:  # seeded by the step, like the batch order: resuming sees the same pixels
                noise = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step + 7)
                batch = data.binarize(batch, noise)
            terms = self.model.training_step(batch, self.optimizers, self.precision, self.settings)
            values = {name: float(value) for name, value in terms.items()}
            self._check_finite(values)
            self.step += 1
            self.train_seconds += time.perf_counter() - tick
            window_examples += batch.shape[0]
            if self.step % cfg.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                rate = window_examples / max(elapsed, 1e-9)
                self.curve.append({"step": self.step, **values, "samples_per_s": round(rate, 1)})
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._validate_and_track_best()
                eta = (total - self.step) * cfg.batch_size / max(rate, 1e-9)
                log.info("%s step %d/%d  %s  | %.0f samples/s | ETA %s", self.family, self.step, total,
                         "  ".join(f"{k} {v:.4g}" for k, v in values.items()), rate, format_duration(eta))
                window_start, window_examples = time.perf_counter(), 0
            if self.step % cfg.checkpoint_every == 0 and self.step < total:
                self.save_state()

    def _validate_and_track_best(self) -> None:
        """Validation loss into the curve; with keep_best, remember the best weights so far."""
        val_loss = self.validation_loss()
        self.curve[-1]["val_loss"] = round(val_loss, 6)
        log.info("%s step %d  validation loss %.4g", self.family, self.step, val_loss)
        if self.train_config.keep_best and (self.best is None or val_loss < self.best["val_loss"]):
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best = {"step": self.step, "val_loss": val_loss, "weights": weights}

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
            torch.manual_seed(self.config.seed)
            for start in range(0, self.data.val.shape[0], batch_size):
                batch = self.data.val[start:start + batch_size].to(self.device)
                total += float(self.model.loss(batch)["loss"]) * batch.shape[0]
                count += batch.shape[0]
        self.model.train()
        return total / max(count, 1)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """(N, C, H, W) uint8 images tiled into one (C, H', W') image, ``nrow`` per row, white gaps.

    Written here rather than imported from torchvision: importing torchvision costs every
    train and evaluate process about 1.5 s on a 2-core CPU.
    """
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value,
                      dtype=images.dtype)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    return grid


def write_samples(model: GenerativeModel, num_samples: int, seed: int, out_dir: Path) -> Path:
    """A PNG grid (images) or a text file of sentences (text) drawn with a fixed seed."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples = model.sample(num_samples, generator).cpu()
    if model.modality == "image":
        grid = image_grid(samples, nrow=int(math.ceil(math.sqrt(num_samples))))
        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="PNG")
        path = out_dir / "samples.png"
        path.write_bytes(buffer.getvalue())
    else:
        tokenizer = data.load_tokenizer(paths.TEXT_DATA)  # token ids -> words, whatever the tokenizer
        path = out_dir / "samples.txt"
        path.write_text("".join(" ".join(tokenizer.decode(row.tolist())) + "\n" for row in samples))
    return path


def write_curve(curve: list[dict[str, float]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in curve for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    path.write_text(buffer.getvalue())


def train_family(config: PipelineConfig, family: str) -> Path:
    """Train ``family`` and write ``models/<family>/``; returns that folder."""
    clock = StepClock(f"train {family}")
    trainer = Trainer(config, family)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    log.info("%s: %d parameters on %s (%s), %d training examples", family, parameters,
             device_name(trainer.device), trainer.precision.name, trainer.data.train.shape[0])
    trainer.try_resume()
    trainer.fit()
    trainer.restore_best()
    val_loss = trainer.validation_loss()
    log.info("%s: validation loss %.4g", family, val_loss)
    out = paths.model_dir(family)
    with replace_directory(out) as tmp:
        save_torch(model_checkpoint(trainer.model, family), tmp / "model.pt")
        write_curve(trainer.curve, tmp / "loss.csv")
        write_samples(trainer.model, trainer.train_config.num_samples, config.seed, tmp)
        atomic_write_json(tmp / "config.json", {
            "family": family, "seed": config.seed, "model": config_to_dict(trainer.model.config),
            "train": trainer.train_config.model_dump(), "data_checksum": trainer.data.checksum,
        })
        examples = trainer.train_config.steps * min(trainer.train_config.batch_size, trainer.data.train.shape[0])
        atomic_write_json(tmp / "summary.json", {
            **clock.record(), "family": family, "device": device_name(trainer.device),
            "precision": trainer.precision.name, "steps": trainer.train_config.steps,
            "train_seconds": round(trainer.train_seconds, 3),
            "train_samples_per_s": round(examples / max(trainer.train_seconds, 1e-9), 1),
            "final_train_loss": trainer.curve[-1]["loss"] if trainer.curve else None,
            "val_loss": val_loss, "parameters": parameters, "torch": torch.__version__,
            "best_step": trainer.best["step"] if trainer.best else None,
        })
    # The resumable state is only useful while the run is unfinished.
    for path in (trainer.state_dir / "state.pt", checksum_path(trainer.state_dir / "state.pt")):
        path.unlink(missing_ok=True)
    return out
