"""Bernoulli restricted Boltzmann machine: persistent contrastive divergence, Gibbs sampling, AIS.

Smolensky 1986; Hinton, "Training Products of Experts by Minimizing Contrastive Divergence",
Neural Computation 14(8), 2002. Persistent CD: Tieleman, "Training Restricted Boltzmann Machines
using Approximations to the Likelihood Gradient", ICML 2008. Annealed importance sampling for
log Z: Neal, "Annealed Importance Sampling", Statistics and Computing 11, 2001; Salakhutdinov &
Murray, "On the Quantitative Analysis of Deep Belief Networks", ICML 2008 (their base-rate model
and beta schedule). Iterate averaging: Polyak & Juditsky, SIAM J. Control Optim. 30(4), 1992.

Energy of binary visible v (D,) and hidden h (H,): E(v, h) = -b.v - c.h - v.W.h, with the free
energy F(v) = -log sum_h exp(-E) = -b.v - sum_j softplus(c_j + (v W)_j), so log p(v) = -F(v) - log Z.

Protocol: the model is a distribution over black/white images. 8-bit pixels are read as Bernoulli
probabilities level / 255: each training batch is binarized afresh (dynamic binarization), and
``log_likelihood`` binarizes its input once with the generator it is given (images already 0/255,
``data.images.binarize: dynamic``, pass unchanged). Its NLL is therefore -log P of binarized test
images: not the 8-bit NLL of the other families, and reported in columns of its own.

log Z is estimated by AIS once per evaluation (``prepare_likelihood``), from the base-rate model
(independent pixels with the training marginals, stored by ``after_fit``) to the RBM along the
geometric path p_beta(v) ~ p_A(v)^(1-beta) p*(v)^beta. Since E[Z_hat] = Z, E[log Z_hat] <= log Z:
a finite AIS run tends to underestimate log Z, i.e. to make the NLL look better than it is.
The standard error of log Z_hat over the ``ais_runs`` runs (delta method) is reported with it;
it is also the uncertainty of every per-image NLL, whose free energy is exact.

Training: PCD's persistent chains follow a moving model, and the last weights of a run at a fixed
learning rate carry that oscillation (the model's mass swings between a few digit classes). With
``weight_average`` the running average of the weights replaces them after the loop (``after_fit``);
on the default data (PCD-1, 2,000 steps) it took the test NLL from 164 to 134 nats.

Samples: ``gibbs_steps`` of block Gibbs sampling from the base-rate model; the image shown is the
mean p(v = 1 | h) of the last step (as VAE samples show the decoder mean), or with ``sample_mean: false``
the binary draw itself, which is what ``plain_sampling`` gives.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import (
    GenerativeModel, ImageSpec, Precision, PreparedLikelihood, TrainSettings, check_sizes,
)


@dataclass
class RBMConfig:
    num_hidden: int = 200
    cd_steps: int = 1           # Gibbs steps per update of the persistent chains (PCD-k)
    num_chains: int = 100       # persistent chains (fantasy particles)
    gibbs_steps: int = 500      # block-Gibbs steps of ``sample``
    sample_mean: bool = True    # ``sample`` shows p(v = 1 | h) of the last step; false: the binary draw v
    weight_average: float = 0.0  # decay of the weights' running average that replaces them after training (0: off)
    ais_runs: int = 100         # independent AIS runs of the log Z estimate
    ais_betas: int = 5000       # intermediate distributions of each AIS run
    init_std: float = 0.01

    def __post_init__(self) -> None:
        check_sizes(self, {"num_hidden": 65536, "cd_steps": 10_000, "num_chains": 100_000, "gibbs_steps": 1_000_000,
                           "init_std": 10.0})
        if not 2 <= self.ais_runs <= 100_000:
            raise ValueError(f"ais_runs must be in [2, 100000] (the standard error needs two), got {self.ais_runs}")
        if not 3 <= self.ais_betas <= 10_000_000:
            raise ValueError(f"ais_betas must be in [3, 10000000], got {self.ais_betas}")
        if not 0.0 <= self.weight_average < 1.0:
            raise ValueError(f"weight_average must be in [0, 1), got {self.weight_average}")


def free_energy(v: torch.Tensor, weight: torch.Tensor, visible_bias: torch.Tensor,
                hidden_bias: torch.Tensor) -> torch.Tensor:
    """F(v) = -b.v - sum_j softplus(c_j + (v W)_j) of visible states v (N, D) -> (N,); W is (D, H)."""
    return -(v @ visible_bias) - F.softplus(v @ weight + hidden_bias).sum(-1)


def _bernoulli(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """0/1 floats with P(1) = probs, drawn from ``generator`` (on its device) or the global stream."""
    if generator is None:
        return torch.bernoulli(probs)
    noise = torch.rand(probs.shape, generator=generator, device=generator.device).to(probs.device)
    return (noise < probs).to(probs.dtype)


def gibbs_chain(v: torch.Tensor, steps: int, weight: torch.Tensor, visible_bias: torch.Tensor,
                hidden_bias: torch.Tensor, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` of block Gibbs sampling h ~ p(h|v), v ~ p(v|h) from v (N, D).

    Returns the final binary v (N, D) and p(v = 1 | h) of the last step (N, D).
    """
    probs = v
    for _ in range(steps):
        h = _bernoulli(torch.sigmoid(v @ weight + hidden_bias), generator)
        probs = torch.sigmoid(h @ weight.T + visible_bias)
        v = _bernoulli(probs, generator)
    return v, probs


def ais_betas(num_betas: int) -> torch.Tensor:
    """Inverse temperatures 0 = beta_0 < ... < beta_K = 1, K = ``num_betas``, float64.

    Salakhutdinov & Murray's schedule scaled to K: uniform steps with 500/14500 of them in
    [0, 0.5], 4000/14500 in [0.5, 0.9] and 10000/14500 in [0.9, 1] (finest where p changes most).
    """
    counts = [max(1, round(num_betas * share / 14500)) for share in (500, 4000)]
    counts.append(max(1, num_betas - sum(counts)))
    pieces = [torch.linspace(lo, hi, n + 1, dtype=torch.float64)[1:]
              for (lo, hi), n in zip(((0.0, 0.5), (0.5, 0.9), (0.9, 1.0)), counts)]
    return torch.cat([torch.zeros(1, dtype=torch.float64), *pieces])


@dataclass
class AISEstimate:
    log_z: float           # log Z_hat = log Z_A + log mean_m w_m
    stderr: float          # standard error of log Z_hat over the runs (delta method)
    log_weights: torch.Tensor  # (runs,) log importance weights
    num_betas: int

    @property
    def effective_sample_size(self) -> float:
        w = torch.softmax(self.log_weights, 0)
        return float(1.0 / w.pow(2).sum())


@torch.no_grad()
def ais_log_partition(weight: torch.Tensor, visible_bias: torch.Tensor, hidden_bias: torch.Tensor,
                      base_visible_bias: torch.Tensor, num_runs: int, num_betas: int,
                      generator: torch.Generator) -> AISEstimate:
    """Annealed importance sampling estimate of log Z of an RBM (Salakhutdinov & Murray 2008).

    Path: log p*_beta(v) = (1 - beta) a.v + beta b.v + sum_j softplus(beta (c_j + (v W)_j)), from the
    base-rate model (beta = 0: independent pixels with logits a = ``base_visible_bias`` and H free hidden
    units, log Z_A = H log 2 + sum_i softplus(a_i)) to the RBM (beta = 1). Each transition is one block
    Gibbs step of the tempered joint p_beta(v, h) ~ exp((1 - beta) a.v + beta (b.v + c.h + v W h)).
    """
    # Matrix products in float32, the weight increments in float64: both terms of an increment read the
    # same rounded field, so rounding only perturbs the model at float32 resolution, never the telescoping sum.
    weight, b, c, a = (t.detach().float() for t in (weight, visible_bias, hidden_bias, base_visible_bias))
    betas = ais_betas(num_betas).tolist()
    v = _bernoulli(torch.sigmoid(a).expand(num_runs, -1), generator)     # (M, D) exact draws of p_A
    log_w = torch.zeros(num_runs, dtype=torch.float64, device=v.device)
    for k in range(1, len(betas)):
        previous, beta = betas[k - 1], betas[k]
        field = (v @ weight + c).double()                                    # (M, H)
        visible_term = (v @ (b - a)).double()                                # (M,)
        log_w += (beta - previous) * visible_term + (F.softplus(beta * field) - F.softplus(previous * field)).sum(-1)
        if k < len(betas) - 1:                                               # T_beta leaves p_beta invariant
            h = _bernoulli(torch.sigmoid(beta * field).float(), generator)
            v = _bernoulli(torch.sigmoid((1 - beta) * a + beta * (h @ weight.T + b)), generator)
    log_z_base = weight.shape[1] * math.log(2.0) + float(F.softplus(a.double()).sum())
    log_mean_w = float(torch.logsumexp(log_w, 0)) - math.log(num_runs)
    ratios = torch.exp(log_w - log_w.max())                                  # w / max w
    stderr = float(ratios.std() / (math.sqrt(num_runs) * ratios.mean()))
    return AISEstimate(log_z_base + log_mean_w, stderr, log_w.float().cpu(), num_betas)


def exact_log_partition(weight: torch.Tensor, visible_bias: torch.Tensor, hidden_bias: torch.Tensor) -> float:
    """log Z by enumerating the smaller layer (at most 2^20 states), float64."""
    num_visible, num_hidden = weight.shape
    small = min(num_visible, num_hidden)
    if small > 20:
        raise ValueError(f"exact log Z enumerates 2^{small} states; only up to 2^20 is allowed")
    states = ((torch.arange(2 ** small)[:, None] >> torch.arange(small)) & 1).double()   # (2^n, n)
    weight, b, c = (t.detach().double() for t in (weight, visible_bias, hidden_bias))
    if num_visible <= num_hidden:
        return float(torch.logsumexp(-free_energy(states, weight, b, c), 0))
    return float(torch.logsumexp(states @ c + F.softplus(states @ weight.T + b).sum(-1), 0))


class RBM(GenerativeModel):
    modality = "image"
    has_likelihood = True
    likelihood_is_estimate = True
    binary_pixels = True
    supports_data_parallel = False  # the persistent chains are the process's own

    def __init__(self, config: RBMConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        d, h = spec.num_dims, config.num_hidden
        self.weight = nn.Parameter(config.init_std * torch.randn(d, h))
        self.visible_bias = nn.Parameter(torch.zeros(d))
        self.hidden_bias = nn.Parameter(torch.zeros(h))
        self.register_buffer("chains", torch.bernoulli(torch.full((config.num_chains, d), 0.5)))  # PCD state
        # Logits of the training pixels' marginals (base-rate model), set by ``after_fit``; 0 = p 0.5.
        self.register_buffer("base_visible_bias", torch.zeros(d))
        # Running (exponential) average of the weights, biases (iterate averaging), and how many updates it holds.
        self.register_buffer("average_weight", torch.zeros(d, h))
        self.register_buffer("average_visible_bias", torch.zeros(d))
        self.register_buffer("average_hidden_bias", torch.zeros(h))
        self.register_buffer("average_updates", torch.zeros((), dtype=torch.long))
        self._ais: tuple[list[torch.Tensor], AISEstimate] | None = None   # estimate and the weights it is for

    def describe(self) -> str:
        return f"{self.config.num_hidden} hidden units, PCD-{self.config.cd_steps}"

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight, self.visible_bias, self.hidden_bias

    def binarize(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W) -> binary float (B, D): each pixel 1 with probability level / 255."""
        return _bernoulli(batch.flatten(1).float() / 255.0, generator)

    # --- training: persistent contrastive divergence -------------------------------------
    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """PCD surrogate: mean F(data) - mean F(chains); its gradient is the PCD estimate of -grad log p.

        In training mode the persistent chains advance ``cd_steps`` Gibbs steps; in eval mode
        (validation) they are read, not moved. Its value is no likelihood: the free-energy gap.
        """
        v_data = self.binarize(batch)                                                 # (B, D)
        with torch.no_grad():
            v_model, _ = gibbs_chain(self.chains, self.config.cd_steps, *self._params())
            if self.training:
                self.chains.copy_(v_model)
            h = torch.sigmoid(v_data @ self.weight + self.hidden_bias)
            reconstruction = (torch.sigmoid(h @ self.weight.T + self.visible_bias) - v_data).pow(2).sum(1).mean()
        gap = free_energy(v_data, *self._params()).mean() - free_energy(v_model, *self._params()).mean()
        return {"loss": gap, "reconstruction_error": reconstruction}

    def _averages(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.average_weight, self.average_visible_bias, self.average_hidden_bias

    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings,
    ) -> dict[str, torch.Tensor]:
        """The default step, then (with ``weight_average``) the running average of the weights moves on."""
        terms = super().training_step(batch, optimizers, precision, settings)
        if self.config.weight_average > 0:
            with torch.no_grad():
                # Bias-corrected start: the average is the plain mean while it holds few updates.
                decay = min(self.config.weight_average, float(self.average_updates) / (float(self.average_updates) + 1))
                for average, current in zip(self._averages(), self._params()):
                    average.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
                self.average_updates += 1
        return terms

    @torch.no_grad()
    def after_fit(self, train_data: torch.Tensor, generator: torch.Generator) -> None:
        """Store the training pixels' marginals (the AIS base-rate model and the samplers' start) and, with
        ``weight_average``, put the averaged weights in place of the last ones."""
        mean = (train_data.flatten(1).double() / 255.0).mean(0)
        mean = (mean * train_data.shape[0] + 0.05) / (train_data.shape[0] + 0.1)     # never exactly 0 or 1
        self.base_visible_bias.copy_(torch.logit(mean).float())
        if self.config.weight_average > 0 and int(self.average_updates) > 0:
            for current, average in zip(self._params(), self._averages()):
                current.copy_(average)

    # --- likelihood: exact free energy, AIS log Z ------------------------------------------
    def estimate_log_partition(self, generator: torch.Generator) -> AISEstimate:
        """AIS estimate of log Z with ``ais_runs`` runs of ``ais_betas`` steps."""
        return ais_log_partition(*self._params(), self.base_visible_bias, self.config.ais_runs,
                                 self.config.ais_betas, generator)

    def prepare_likelihood(self, generator: torch.Generator) -> PreparedLikelihood:
        """Run AIS once; ``log_likelihood`` uses this estimate until the weights change. Its standard error is
        that of every log-likelihood (the free energy is exact)."""
        estimate = self.estimate_log_partition(generator)
        self._ais = ([p.detach().clone() for p in self._params()], estimate)
        return PreparedLikelihood(estimate.stderr, (
            f"log Z_hat = {estimate.log_z:.3f} ± {estimate.stderr:.3f} nats (s.e. over {self.config.ais_runs} AIS "
            f"runs x {estimate.num_betas} intermediate distributions, delta method; base-rate start; effective "
            f"sample size {estimate.effective_sample_size:.1f} of {self.config.ais_runs})"))

    def likelihood_bounds(self, iw_samples: int) -> dict[str, tuple[int, str]]:
        return {"_ais": (1, "AIS estimate, -log P(v) = F(v) + log Z_hat (neither exact nor a bound; a finite AIS "
                            "run tends to underestimate log Z, so the NLL tends to be optimistic)")}

    def _cached_estimate(self) -> AISEstimate | None:
        if self._ais is None:
            return None
        weights, estimate = self._ais
        same = all(torch.equal(a, b.detach()) for a, b in zip(weights, self._params()))
        return estimate if same else None

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """log P(v) in nats of the binarized images (B,): -F(v) - log Z_hat.

        log Z_hat is the ``prepare_likelihood`` estimate while the weights are unchanged; otherwise AIS
        runs here with ``generator`` (which also binarizes 8-bit input).
        """
        estimate = self._cached_estimate()
        if estimate is None:
            estimate = self.estimate_log_partition(generator or torch.Generator(self.device).manual_seed(0))
        v = self.binarize(batch, generator)
        return -free_energy(v, *self._params()) - estimate.log_z

    # --- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``gibbs_steps`` block-Gibbs steps from the base-rate model; the last step's p(v = 1 | h) as uint8
        levels (``sample_mean``) or its binary draw v as 0/255."""
        start_probs = torch.sigmoid(self.base_visible_bias).expand(num_samples, -1)
        v0 = _bernoulli(start_probs, generator)
        v, probs = gibbs_chain(v0, self.config.gibbs_steps, *self._params(), generator=generator)
        shape = (num_samples, self.spec.channels, self.spec.height, self.spec.width)
        return ((probs if self.config.sample_mean else v) * 255).round().to(torch.uint8).view(shape)

    def describe_sampling(self) -> str:
        shown = "p(v=1|h) of the last step (mean image)" if self.config.sample_mean else "the binary draw v"
        return f"{self.config.gibbs_steps} block-Gibbs steps from the base-rate model; {shown}"

    def plain_sampling(self) -> "RBM | None":
        """The same weights drawing binary images, when ``sample`` shows conditional means."""
        if not self.config.sample_mean:
            return None
        plain = copy.deepcopy(self)
        plain.config = dataclasses.replace(self.config, sample_mean=False)
        return plain
