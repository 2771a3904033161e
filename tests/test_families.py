"""Contract tests, parametrized over the registry: every family answers the same questions."""

from __future__ import annotations


import pytest
import torch

from genai_models.base import Precision, TrainSettings
from genai_models.registry import REGISTRY, register
from tasks.checkpoints import load_model, model_checkpoint, save_torch
from tests.conftest import OVERFIT_STEPS, TINY_CONFIGS, TINY_IMAGE, TINY_TEXT, tiny_batch, tiny_model


def test_every_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(REGISTRY)


def test_registering_a_duplicate_name_is_an_error():
    family = REGISTRY["vae"]
    with pytest.raises(ValueError, match="already registered"):
        register("vae", family.config_class, family.model_class)


def _case(family_case, seed: int = 0):
    """The tiny model of a (family, image spec) case and a batch of its data."""
    name, image = family_case
    model = tiny_model(name, seed=seed, image=image)
    return model, tiny_batch(model.modality, image=image)


def test_loss_is_finite_and_gradients_reach_every_parameter(family_case):
    model, batch = _case(family_case)
    terms = model.loss(batch)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_training_step_changes_the_weights(family_case):
    model, batch = _case(family_case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(learning_rate=1e-2)
    terms = model.training_step(batch, model.configure_optimizers(settings),
                                Precision(torch.device("cpu"), enabled=True), settings)
    assert all(torch.isfinite(v) for v in terms.values())
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


def test_samples_have_the_data_shape_and_range(family_case):
    model = _case(family_case)[0].eval()
    samples = model.sample(5, torch.Generator().manual_seed(0))
    if model.modality == "image":
        image = family_case[1]
        assert samples.shape == (5, image.channels, image.height, image.width)
        assert samples.dtype == torch.uint8
        if image.channels == 3:  # the channels are drawn, not copies of one grey image
            assert not torch.equal(samples[:, 0], samples[:, 1]) and not torch.equal(samples[:, 1], samples[:, 2])
    else:
        assert samples.shape == (5, TINY_TEXT.max_len) and samples.dtype == torch.long
        assert (samples[:, 0] == TINY_TEXT.bos_id).all()
        assert ((samples >= 0) & (samples < TINY_TEXT.vocab_size)).all()
        for row in samples.tolist():  # exactly one eos, then only padding
            assert row.count(TINY_TEXT.eos_id) == 1
            assert all(t == TINY_TEXT.pad_id for t in row[row.index(TINY_TEXT.eos_id) + 1:])
            assert TINY_TEXT.pad_id not in row[:row.index(TINY_TEXT.eos_id)]


def test_same_seed_same_samples_other_seed_other_samples(family_case):
    model = _case(family_case)[0].eval()
    first = model.sample(6, torch.Generator().manual_seed(3))
    again = model.sample(6, torch.Generator().manual_seed(3))
    other = model.sample(6, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_save_load_gives_the_same_model(family_case, tmp_path):
    model, batch = _case(family_case, seed=1)
    model.eval()
    path = tmp_path / "model.pt"
    save_torch(model_checkpoint(model, family_case[0]), path)
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.spec == model.spec
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model.sample(4, generator()), loaded.sample(4, generator()))
    if model.has_likelihood:
        assert torch.allclose(model.log_likelihood(batch, generator=generator()),
                              loaded.log_likelihood(batch, generator=generator()))


def test_log_likelihood_is_per_example_and_at_most_zero(family_case):
    model, batch = _case(family_case)
    model.eval()
    if not model.has_likelihood:
        with pytest.raises(NotImplementedError):
            model.log_likelihood(batch)
        return
    ll = model.log_likelihood(batch, generator=torch.Generator().manual_seed(0))
    assert ll.shape == (8,) and torch.isfinite(ll).all() and (ll <= 0).all()


def test_overfits_one_batch(family_name):
    """A few hundred steps on one fixed batch cut the training loss substantially."""
    model = tiny_model(family_name)
    batch = tiny_batch(model.modality, batch_size=16)
    if model.binary_pixels:  # black/white data: grey levels would be noise (Bernoulli draws) it cannot memorise
        batch = (batch >= 128).to(torch.uint8) * 255
    settings = TrainSettings(learning_rate=3e-3)
    optimizers, precision = model.configure_optimizers(settings), Precision(torch.device("cpu"), enabled=False)
    torch.manual_seed(0)
    if model.has_likelihood:
        measure = lambda: -float(model.log_likelihood(batch, generator=torch.Generator().manual_seed(0)).mean())  # noqa: E731
    elif "discriminator" in model.loss(batch):  # GAN: the discriminator learns to tell this batch from samples
        measure = lambda: float(model.loss(batch)["discriminator"].detach())  # noqa: E731
    else:  # an autoencoder without likelihood: its reconstruction objective
        measure = lambda: float(model.loss(batch)["loss"].detach())  # noqa: E731
    start = measure()
    for _ in range(OVERFIT_STEPS.get(family_name, 300)):
        model.training_step(batch, optimizers, precision, settings)
    end = measure()
    assert end < 0.5 * start, f"{family_name}: {start:.3f} -> {end:.3f}"


def test_transformer_is_causal():
    """The logits at position t do not depend on tokens after t (checked through gradients)."""
    model = tiny_model("transformer_lm").eval()
    tokens = tiny_batch("text", batch_size=1)
    embeddings = model.token_embedding(tokens).detach().requires_grad_(True)
    positions = torch.arange(tokens.shape[1])
    x = embeddings + model.position_embedding(positions)
    for block in model.blocks:
        x = block(x)
    t = 4
    model.head(model.norm(x))[0, t].sum().backward()
    grad_by_position = embeddings.grad[0].abs().sum(-1)
    assert (grad_by_position[t + 1:] == 0).all()
    assert (grad_by_position[:t + 1] > 0).all()


def test_vae_importance_weighted_bound_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    model = tiny_model("vae").eval()
    batch = tiny_batch("image", batch_size=16)
    elbo = model.log_likelihood(batch, importance_samples=1, generator=torch.Generator().manual_seed(0))
    elbo_mean = torch.stack([model.log_likelihood(batch, 1, torch.Generator().manual_seed(s)) for s in range(20)]).mean()
    iwae = model.log_likelihood(batch, importance_samples=64, generator=torch.Generator().manual_seed(1))
    assert elbo.shape == iwae.shape == (16,)
    assert iwae.mean() > elbo_mean


def test_vae_kl_is_zero_for_a_standard_normal_and_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    from genai_models.vae import kl_to_standard_normal

    assert torch.equal(kl_to_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-5)


# Families whose ``sample`` can be something other than a plain draw: the setting that does it.
NOT_PLAIN = {"vae": {"sample_mode": "mean"}, "gmm": {"sample_mode": "denoised"},
             "realnvp": {"sample_temperature": 0.7}}


@pytest.mark.parametrize("family", sorted(NOT_PLAIN))
def test_plain_sampling_draws_plainly_from_the_same_weights(family):
    fam = REGISTRY[family]
    torch.manual_seed(0)
    model = fam.build(fam.config_class(**{**TINY_CONFIGS[family], **NOT_PLAIN[family]}), TINY_IMAGE).eval()
    plain = model.plain_sampling()
    assert plain is not None and plain is not model and plain.plain_sampling() is None
    assert all(p is q for p, q in zip(model.parameters(), plain.parameters()))  # the same weights
    assert model.describe_sampling() != plain.describe_sampling()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shown, drawn = model.sample(64, generator()), plain.sample(64, generator())
    assert shown.shape == drawn.shape and shown.dtype == drawn.dtype == torch.uint8
    assert not torch.equal(shown, drawn)
    # plain draws carry the model's own noise: more spread around the same weights' structure
    assert drawn.float().std(0).mean() > shown.float().std(0).mean()
    assert torch.equal(model.sample(64, generator()), shown)  # making the plain copy changed nothing



def test_vae_decoder_mean_is_the_mean_of_the_discretized_logistic():
    from genai_models.metrics.likelihood import discretized_logistic_log_prob
    from genai_models.vae import discretized_logistic_mean

    location = torch.tensor([-40.0, 0.0, 60.0, 127.5, 250.0, 300.0])
    log_scale = torch.tensor([3.0, 0.0, 4.0, 1.0, 2.0, 0.5])
    levels = torch.arange(256.0)[:, None]
    probs = discretized_logistic_log_prob(levels.expand(256, 6), location, log_scale).exp()  # (256, 6)
    assert torch.allclose(probs.sum(0), torch.ones(6), atol=1e-5)
    assert torch.allclose(discretized_logistic_mean(location, log_scale), (levels * probs).sum(0), atol=1e-3)
    # a wide logistic's mass is clipped into the edge bins: its mean is not its location
    mean = discretized_logistic_mean(location, log_scale)
    assert mean[0] > 0 > location[0] and mean[2] > location[2] + 10


def test_vae_kl_warmup_weights_the_kl_only_in_training_and_only_at_first():
    fam = REGISTRY["vae"]
    torch.manual_seed(0)
    model = fam.build(fam.config_class(**TINY_CONFIGS["vae"], kl_warmup_steps=4), TINY_IMAGE)
    batch, settings = tiny_batch("image"), TrainSettings(learning_rate=1e-3)
    optimizers, precision = model.configure_optimizers(settings), Precision(torch.device("cpu"), enabled=False)
    weights = []
    for _ in range(6):
        weights.append(float(model.kl_weight()))
        torch.manual_seed(1)
        terms = model.loss(batch)
        assert torch.allclose(terms["loss"], terms["reconstruction"] + weights[-1] * terms["kl"])
        model.training_step(batch, optimizers, precision, settings)
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0] and int(model.training_steps) == 6
    model.training_steps.zero_()
    model.eval()  # validation and bounds: the full ELBO whatever the step
    terms = model.loss(batch)
    assert torch.allclose(terms["loss"], terms["elbo"])
