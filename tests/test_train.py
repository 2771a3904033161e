"""The training loop: seeded batches, resume to identical weights, NaN detection, outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from genai_models.registry import REGISTRY
from tasks import paths
from tasks.config import parse_params
from tasks.data import prepare_images, prepare_text
from tasks.train import Trainer, TrainingDiverged, batch_indices, train_family
from tests.conftest import REPO_ROOT, TINY_CONFIGS


def tiny_params(steps: int = 6, checkpoint_every: int = 3) -> dict:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["images"]["max_train"] = 256
    params["data"]["text"]["max_train"] = 200
    for name, block in params["families"].items():
        block["model"] = dict(TINY_CONFIGS[name])
        # Validation (and keep_best) on text families only: on image families eval_every also draws a
        # quality curve (FID on samples), which needs the features stage these tests do not run.
        text = REGISTRY[name].modality == "text"
        block["train"].update(steps=steps, batch_size=16, log_every=2, checkpoint_every=checkpoint_every,
                              num_samples=4, eval_every=2 if text else None,
                              keep_best=bool(block["train"].get("keep_best")) and text,
                              warmup_steps=min(block["train"].get("warmup_steps", 0), 2))
    return params


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory with prepared mnist-5k and lee-news data (tiny caps)."""
    monkeypatch.chdir(tmp_path)
    config = parse_params(tiny_params())
    prepare_images(config.data.images, config.seed, paths.IMAGE_DATA)
    prepare_text(config.data.text, config.seed, paths.TEXT_DATA)
    return tmp_path


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_the_step():
    first_epoch = torch.cat([batch_indices(s, 10, 3, seed=0) for s in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # 3 full batches, the last partial one dropped
    assert torch.equal(batch_indices(4, 10, 3, seed=0), batch_indices(4, 10, 3, seed=0))
    assert not torch.equal(batch_indices(0, 10, 3, seed=0), batch_indices(3, 10, 3, seed=0))


RECIPES = {"plain": {}, "ema+cosine": {"ema_decay": 0.9, "lr_schedule": "cosine", "warmup_steps": 2}}


# wgan_gp and gmm keep a host copy of a buffer (critic steps, initialised) that a resume must re-read.
@pytest.mark.parametrize(("family", "recipe"), [(name, "plain") for name in ("vae", "dcgan", "transformer_lm", "wgan_gp",
                                                                             "gmm", "hmm", "rbm")]
                         + [("dcgan", "ema+cosine"), ("wgan_gp", "ema+cosine")])
def test_resumed_training_ends_with_the_same_weights(workspace, family, recipe, monkeypatch):
    params = tiny_params(steps=6, checkpoint_every=3)
    params["families"][family]["train"].update(RECIPES[recipe])
    config = parse_params(params)
    uninterrupted = Trainer(config, family)
    uninterrupted.fit()

    interrupted = Trainer(config, family)
    original_save = Trainer.save_state

    def save_then_die(self):
        original_save(self)
        raise KeyboardInterrupt  # the process dies right after the step-3 checkpoint

    monkeypatch.setattr(Trainer, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "save_state", original_save)

    resumed = Trainer(config, family)
    resumed.try_resume()
    assert resumed.step == 3
    resumed.fit()
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{family}: {name} differs after resume"
    if RECIPES[recipe]:
        for name, value in uninterrupted.ema.averaged.items():
            assert torch.equal(value, resumed.ema.averaged[name]), f"{family}: EMA of {name} differs after resume"
        assert resumed.ema.num_updates == 6
        rates = [[g["lr"] for opt in t.optimizers for g in opt.param_groups] for t in (uninterrupted, resumed)]
        assert rates[0] == rates[1] and rates[0][0] < config.families[family].train.learning_rate


def test_state_from_another_config_is_not_resumed(workspace):
    config = parse_params(tiny_params(steps=6, checkpoint_every=3))
    trainer = Trainer(config, "vae")
    trainer.step = 3
    trainer.save_state()
    other = tiny_params(steps=6, checkpoint_every=3)
    other["families"]["vae"]["train"]["learning_rate"] = 0.5
    fresh = Trainer(parse_params(other), "vae")
    fresh.try_resume()
    assert fresh.step == 0


def test_a_nan_loss_stops_training_naming_family_step_and_term(workspace, monkeypatch):
    config = parse_params(tiny_params(steps=6))
    trainer = Trainer(config, "vae")
    real_step = trainer.model.training_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real_step(*args, **kwargs)
        if calls["n"] == 2:
            terms["kl"] = torch.tensor(float("nan"))
        return terms

    monkeypatch.setattr(trainer.model, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"vae: loss term 'kl' is nan at step 2"):
        trainer.fit()
    assert trainer.step == 2  # the terms are read back every log_every (2) steps: step 2 is such a check


def test_a_diverged_run_keeps_the_last_good_checkpoint_and_the_previous_model(workspace, monkeypatch):
    from genai_models.base import GenerativeModel
    from tasks.checkpoints import load_torch

    previous = train_family(parse_params(tiny_params(steps=4)), "vae")  # an earlier, finished model
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    changed = tiny_params(steps=8, checkpoint_every=2)
    changed["families"]["vae"]["train"]["learning_rate"] = 0.002
    real_step, calls = GenerativeModel.training_step, {"n": 0}

    def inf_at_step_5(self, *args, **kwargs):
        calls["n"] += 1
        terms = real_step(self, *args, **kwargs)
        if calls["n"] == 5:
            terms["loss"] = torch.tensor(float("inf"))
        return terms

    monkeypatch.setattr(GenerativeModel, "training_step", inf_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"vae: loss term 'loss' is inf at step 5"):
        train_family(parse_params(changed), "vae")
    # Loss terms are read back (and checked) every log_every / checkpoint_every steps, here 2: the run
    # stops at the first check after the bad step, before any further checkpoint.
    assert calls["n"] == 6
    assert load_torch(paths.RUN_STATE / "vae" / "seed-0" / "state.pt")["step"] == 4  # the last good state, verified
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


def test_train_family_writes_checkpoint_curve_samples_and_summary(workspace):
    config = parse_params(tiny_params(steps=4))
    for family in ("vae", "transformer_lm"):
        out = train_family(config, family)
        assert {"model.pt", "loss.csv", "config.json", "summary.json"} <= {p.name for p in out.iterdir()}
        assert (out / ("samples.png" if family == "vae" else "samples.txt")).stat().st_size > 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["train_samples_per_s"] > 0 and summary["wall_s"] > 0
        assert (out / "loss.csv").read_text().splitlines()[0].startswith("step,loss")
        assert not list((paths.RUN_STATE / family).rglob("state.pt"))


def test_with_ema_the_average_is_validated_and_saved(workspace):
    from tasks.checkpoints import load_model

    params = tiny_params(steps=4)
    params["families"]["transformer_lm"]["train"].update(ema_decay=0.5, eval_every=2, keep_best=True)
    params["families"]["dcgan"]["train"].update(ema_decay=0.5)
    config = parse_params(params)
    trainer = Trainer(config, "transformer_lm")
    trainer.fit()
    live = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with trainer.weights_in_use():
        ema_val_loss = trainer.validation_loss()
    assert trainer.validation_loss() != ema_val_loss  # the average is not the last weights
    assert trainer.curve[-1]["val_loss"] == round(ema_val_loss, 6)  # validation saw the average
    assert trainer.best["step"] in (2, 4) and trainer.best["val_loss"] <= ema_val_loss
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in live.items())  # and gave them back

    gan = Trainer(config, "dcgan")
    gan.fit()
    saved = load_model(train_family(config, "dcgan") / "model.pt").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in gan.ema.averaged.items())  # the same run's average


def test_image_grid_tiles_like_torchvision_make_grid():
    from torchvision.utils import make_grid

    from tasks.samples import image_grid

    for channels, count in ((1, 10), (3, 9)):
        images = torch.randint(0, 256, (count, channels, 7, 5), dtype=torch.uint8)
        ours, reference = image_grid(images, nrow=4), make_grid(images, nrow=4, padding=2, pad_value=255)
        # torchvision turns one channel into three equal ones; ours keeps the channels it got.
        assert torch.equal(ours, reference[:channels])


def test_dynamically_binarized_training_sees_fresh_black_and_white_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params(steps=4, checkpoint_every=10)
    params["data"]["images"]["binarize"] = "dynamic"
    config = parse_params(params)
    prepare_images(config.data.images, config.seed, paths.IMAGE_DATA)
    trainer = Trainer(config, "pixelcnn")
    seen = []
    original = trainer.model.training_step
    monkeypatch.setattr(trainer.model, "training_step", lambda batch, *a: (seen.append(batch.clone()), original(batch, *a))[1])
    trainer.fit()
    assert trainer.data.binarize and len(seen) == 4
    assert all(set(batch.unique().tolist()) <= {0, 255} for batch in seen)
    assert set(trainer.data.train.unique().tolist()) - {0, 255}  # the stored split keeps its grey levels
    # the draws are a function of seed and step, so a rerun (or a resumed run) sees the same pixels
    rerun, seen_again = Trainer(config, "pixelcnn"), []
    original = rerun.model.training_step
    monkeypatch.setattr(rerun.model, "training_step", lambda batch, *a: (seen_again.append(batch.clone()), original(batch, *a))[1])
    rerun.fit()
    assert all(torch.equal(a, b) for a, b in zip(seen, seen_again))


def test_train_family_runs_after_fit_once_and_saves_what_it_fitted(workspace, monkeypatch):
    """ae_gmm fits its latent mixture after the loop; the mixture is in the saved checkpoint."""
    from genai_models.ae_gmm import AEGMM
    from tasks.checkpoints import load_model

    calls = []
    original = AEGMM.after_fit

    def counted(self, train_data, generator):
        calls.append((self.training, train_data.shape))
        return original(self, train_data, generator)

    monkeypatch.setattr(AEGMM, "after_fit", counted)
    config = parse_params(tiny_params(steps=4, checkpoint_every=2))
    out = train_family(config, "ae_gmm")
    assert calls == [(True, (256, 1, 28, 28))]          # once, with the whole (capped) training split
    model = load_model(out / "model.pt")
    assert bool(model.mixture_fitted)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after_fit_seconds"] >= 0
    assert summary["model_summary"] == model.describe() != ""
