"""Word-level hidden Markov model, trained by (stepwise) Baum-Welch EM.

Baum, Petrie, Soules & Weiss, "A maximization technique occurring in the statistical analysis
of probabilistic functions of Markov chains", Ann. Math. Statist. 41(1), 1970; Rabiner, "A
tutorial on hidden Markov models", Proc. IEEE 77(2), 1989 (the scaled forward algorithm).
Stepwise (mini-batch) EM: Cappé & Moulines, "On-line EM for latent data models", JRSS-B 71(3),
2009; Liang & Klein, "Online EM for Unsupervised Models", NAACL 2009. Expected counts as the
gradient of the log-likelihood: Eisner, "Inside-Outside and Forward-Backward Algorithms Are Just
Backprop", 2016 workshop on structured prediction.

The generative story of a sentence: a start state s_1 ~ pi; at every position t the state
emits a token w_t ~ B[s_t] and moves on, s_{t+1} ~ A[s_t]; the sentence ends when a state emits
``eos``. ``eos`` is an ordinary emitted symbol, ``pad`` and ``bos`` are never emitted, so
p(w_1 .. w_n eos) is a proper distribution over finite sentences and the NLL counts exactly
what the Transformer LM's counts: every token after ``bos``, ``eos`` included.

Why EM and not gradient steps: EM has no learning rate to tune, each full-batch step provably
never lowers the training likelihood (a test checks it), and its M-step is a closed-form count
normalisation. It fits the mini-batch training loop as stepwise EM: the expected counts of each
batch go into running sufficient statistics with step size eta_k = (k + 1)^-decay, and the
parameters are re-estimated from them. With ``step_size_decay: 0`` and a batch that holds the
whole training split (``batch_size`` >= its size) every step is one exact Baum-Welch iteration.
The expected counts (the E-step) are the gradients of the scaled forward pass's log-likelihood
with respect to the log-parameters, so no separate backward recursion is written (and none can
disagree with the forward one). ``pseudocount`` adds a symmetric Dirichlet prior (MAP-EM), which
keeps every test word's probability above zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genai_models.base import GenerativeModel, Precision, TextSpec, TrainSettings, check_sizes


@dataclass
class HMMConfig:
    num_states: int = 64           # K
    step_size_decay: float = 0.6   # eta_k = (k + 1)^-decay; 0 = plain Baum-Welch on each batch
    pseudocount: float = 0.01      # Dirichlet prior added to every expected count (0 = maximum likelihood)
    init_scale: float = 1.0        # std of the random initial logits (breaks the states' symmetry)

    def __post_init__(self) -> None:
        check_sizes(self, {"num_states": 65536})
        if not 0.0 <= self.step_size_decay <= 1.0:
            raise ValueError(f"step_size_decay must be in [0, 1], got {self.step_size_decay}")
        if self.pseudocount < 0:
            raise ValueError(f"pseudocount must be >= 0, got {self.pseudocount}")
        check_sizes(self, {"init_scale": 100.0})


def forward_log_likelihood(targets: torch.Tensor, mask: torch.Tensor, log_initial: torch.Tensor,
                           log_transitions: torch.Tensor, log_emissions: torch.Tensor) -> torch.Tensor:
    """log p(w_1 .. w_T) of each sequence by the scaled forward algorithm (Rabiner 1989), nats.

    Args:
        targets: (B, T) emitted token ids; positions where ``mask`` is False are ignored.
        mask: (B, T) bool, True on real tokens; each row's True positions come first.
        log_initial: (K,) log pi; log_transitions: (K, K) log A[from, to]; log_emissions: (K, V).

    Returns:
        (B,) log-likelihoods; differentiable in the three log-parameters (their gradients are
        the expected initial, transition and emission counts).
    """
    targets = torch.where(mask, targets, targets[:, :1])           # ignored positions read a real column
    # Per-word scaling: B[k, w] / max_k B[k, w] is in (0, 1] for the best state, so the products below
    # neither underflow nor overflow; the log of the scale is added back to the log-likelihood.
    column_max = log_emissions.max(0).values.detach()            # (V,)
    column_max = torch.where(torch.isfinite(column_max), column_max, 0.0)  # pad/bos columns: never emitted
    emission = (log_emissions - column_max).exp().T[targets]      # (B, T, K)
    log_scale = torch.where(mask, column_max[targets], 0.0).sum(1)  # (B,)
    transitions = log_transitions.exp()
    per_position = emission.unbind(1)
    alpha = log_initial.exp() * per_position[0]                   # (B, K), unnormalised
    norm = alpha.sum(-1, keepdim=True)
    log_norms = [norm.squeeze(-1).log()]
    alpha = alpha / norm
    for t in range(1, targets.shape[1]):
        new_alpha = (alpha @ transitions) * per_position[t]          # (B, K)
        new_norm = new_alpha.sum(-1, keepdim=True)
        live = mask[:, t]
        log_norms.append(torch.where(live, new_norm.squeeze(-1).log(), 0.0))
        alpha = torch.where(live[:, None], new_alpha / new_norm, alpha)
    log_prob = log_scale + torch.stack(log_norms, 1).sum(1)
    return log_prob


class HMM(GenerativeModel):
    modality = "text"
    has_likelihood = True
    supports_data_parallel = False  # stepwise EM on each process's batch: no gradients to average

    def __init__(self, config: HMMConfig, spec: TextSpec) -> None:
        super().__init__(config, spec)
        k, v = config.num_states, spec.vocab_size
        self.initial_logits = nn.Parameter(config.init_scale * torch.randn(k))
        self.transition_logits = nn.Parameter(config.init_scale * torch.randn(k, k))
        self.emission_logits = nn.Parameter(config.init_scale * torch.randn(k, v))
        emittable = torch.ones(v, dtype=torch.bool)
        emittable[[spec.pad_id, spec.bos_id]] = False
        self.register_buffer("emittable", emittable, persistent=False)
        # Running expected counts of stepwise EM and the number of EM steps taken (saved: resuming continues them).
        self.register_buffer("initial_counts", torch.zeros(k))
        self.register_buffer("transition_counts", torch.zeros(k, k))
        self.register_buffer("emission_counts", torch.zeros(k, v))
        self.register_buffer("em_steps", torch.zeros((), dtype=torch.long))

    def describe(self) -> str:
        return f"{self.config.num_states} hidden states"

    def log_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised log pi (K,), log A (K, K) and log B (K, V); pad and bos have probability 0."""
        emission_logits = self.emission_logits.masked_fill(~self.emittable, float("-inf"))
        return (torch.log_softmax(self.initial_logits, 0), torch.log_softmax(self.transition_logits, 1),
                torch.log_softmax(emission_logits, 1))

    def _targets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch[:, 1:]                                   # every token after bos
        return targets, targets != self.spec.pad_id

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact NLL in nats per token of the batch (forward algorithm); what EM increases."""
        targets, mask = self._targets(batch)
        log_likelihood = forward_log_likelihood(targets, mask, *self.log_parameters())
        return {"loss": -log_likelihood.sum() / mask.sum()}

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact log p(sentence) in nats: every token after bos, eos included; (B,)."""
        targets, mask = self._targets(batch)
        return forward_log_likelihood(targets, mask, *self.log_parameters())

    # --- training: stepwise EM ----------------------------------------------------------------
    def configure_optimizers(self, settings: TrainSettings) -> list[torch.optim.Optimizer]:
        return []  # EM re-estimates the parameters in closed form: no optimizer, no learning rate

    def expected_counts(self, batch: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """E-step: the batch's log-likelihood (B,) and its expected initial (K,), transition (K, K) and
        emission (K, V) counts, as the gradients of the summed log-likelihood in the log-parameters."""
        targets, mask = self._targets(batch)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in self.log_parameters()]
            log_likelihood = forward_log_likelihood(targets, mask, *leaves)
            counts = torch.autograd.grad(log_likelihood.sum(), leaves)
        return log_likelihood.detach(), counts

    @torch.no_grad()
    def em_step(self, batch: torch.Tensor, step_size: float | None = None) -> torch.Tensor:
        """One stepwise-EM update on ``batch``; returns the batch's log-likelihood (B,) before it.

        ``step_size`` overrides eta_k (1.0 with the whole training set as ``batch`` = one Baum-Welch step).
        """
        log_likelihood, (initial, transitions, emissions) = self.expected_counts(batch)
        eta = (float(self.em_steps) + 1.0) ** -self.config.step_size_decay if step_size is None else step_size
        for running, new in ((self.initial_counts, initial), (self.transition_counts, transitions),
                             (self.emission_counts, emissions)):
            running.mul_(1.0 - eta).add_(new, alpha=eta)
        self.em_steps += 1
        self._maximize()
        return log_likelihood

    def _maximize(self) -> None:
        """M-step: each parameter row = its (prior-smoothed) expected counts, normalised."""
        prior = self.config.pseudocount
        emission_prior = prior * self.emittable.to(self.emission_counts.dtype)
        for logits, counts, pseudo in ((self.initial_logits, self.initial_counts, prior),
                                       (self.transition_logits, self.transition_counts, prior),
                                       (self.emission_logits, self.emission_counts, emission_prior)):
            smoothed = counts + pseudo
            total = smoothed.sum(-1, keepdim=True)
            # A state that no sentence visits (and with no prior) keeps its previous parameters.
            probs = torch.where(total > 0, smoothed / total.clamp(min=1e-30), torch.softmax(logits, -1))
            logits.copy_(probs.clamp(min=1e-30).log())

    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings,
    ) -> dict[str, torch.Tensor]:
        """One stepwise-EM step (the optimizers and precision are unused: EM is closed-form, fp32)."""
        log_likelihood = self.em_step(batch)
        num_tokens = (batch[:, 1:] != self.spec.pad_id).sum()
        return {"loss": -log_likelihood.sum() / num_tokens}

    # --- sampling ----------------------------------------------------------------------------
    def describe_sampling(self) -> str:
        return "ancestral draws (state, word, next state, ...) until eos"

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Ancestral sampling: bos, then tokens until ``eos`` (forced at the last slot), then pad; (N, max_len)."""
        spec, device = self.spec, generator.device
        log_initial, log_transitions, log_emissions = (p.to(device) for p in self.log_parameters())
        tokens = torch.full((num_samples, spec.max_len), spec.pad_id, dtype=torch.long, device=device)
        tokens[:, 0] = spec.bos_id
        finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
        state = torch.multinomial(log_initial.exp().expand(num_samples, -1), 1, generator=generator).squeeze(1)
        for position in range(1, spec.max_len):
            probs = log_emissions[state].exp()                                  # (N, V)
            if position == spec.max_len - 1:                                     # the last slot closes the sentence
                probs = torch.zeros_like(probs)
                probs[:, spec.eos_id] = 1.0
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tokens[:, position] = torch.where(finished, spec.pad_id, token)
            finished |= token == spec.eos_id
            if finished.all():
                break
            state = torch.multinomial(log_transitions[state].exp(), 1, generator=generator).squeeze(1)
        return tokens.to(self.device)
