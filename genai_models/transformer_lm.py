"""Transformer decoder language model (causal self-attention, learned positions, tied embeddings).

Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (arXiv:1706.03762); the
decoder-only, pre-LayerNorm layout of Radford et al., "Language Models are
Unsupervised Multitask Learners" (GPT-2), 2019.

The network (``TransformerLM``) and the sampling loop (``generate``) are kept apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import GenerativeModel, TextSpec, check_sizes


@dataclass
class TransformerLMConfig:
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ff_multiplier: int = 4
    dropout: float = 0.1
    temperature: float = 1.0  # sampling temperature used by ``sample``

    def __post_init__(self) -> None:
        check_sizes(self, {"d_model": 16384, "num_layers": 256, "num_heads": 256, "ff_multiplier": 64,
                           "temperature": 100.0})
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, heads, L, head_dim)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: TransformerLMConfig) -> None:
        super().__init__()
        width = config.d_model
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.ff_multiplier * width), nn.GELU(),
            nn.Linear(config.ff_multiplier * width, width), nn.Dropout(config.dropout),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TransformerLM(GenerativeModel):
    modality = "text"
    has_likelihood = True

    def __init__(self, config: TransformerLMConfig, spec: TextSpec) -> None:
        super().__init__(config, spec)
        self.token_embedding = nn.Embedding(spec.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(spec.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, spec.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> next-token logits (B, L, vocab)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _token_log_probs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of every target token (B, L'-1) and the mask of real (non-pad) targets.

        L' <= L: trailing positions that are padding in every row are cut first. They change no
        real token's log-prob (attention is causal, padding only follows eos) but cost as much
        as real tokens; subword tokens make max_len long while most batches are far shorter.
        """
        length = int((batch != self.spec.pad_id).sum(1).max())
        batch = batch[:, : max(length, 2)]
        logits = self(batch[:, :-1]).float()
        targets = batch[:, 1:]
        log_probs = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return log_probs, targets != self.spec.pad_id

    def loss_weight(self, batch: torch.Tensor) -> torch.Tensor:
        """``loss`` averages over the real (non-pad) target tokens: their count, a scalar."""
        return (batch[:, 1:] != self.spec.pad_id).sum()

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean next-token cross-entropy in nats over the real tokens of the batch."""
        log_probs, mask = self._token_log_probs(batch)
        return {"loss": -(log_probs * mask).sum() / mask.sum()}

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact log p(sentence) in nats: every token after bos, eos included; (B,)."""
        log_probs, mask = self._token_log_probs(batch)
        return (log_probs * mask).sum(1)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        return generate(self, num_samples, generator, temperature=self.config.temperature)


@torch.no_grad()
def generate(
    model: TransformerLM, num_samples: int, generator: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
    """Ancestral sampling from bos until eos (or max_len): (num_samples, max_len) token ids.

    ``pad`` and ``bos`` are never sampled; positions after ``eos`` are ``pad``.
    """
    spec = model.spec
    was_training = model.training
    model.eval()
    tokens = torch.full((num_samples, spec.max_len), spec.pad_id, dtype=torch.long, device=model.device)
    tokens[:, 0] = spec.bos_id
    finished = torch.zeros(num_samples, dtype=torch.bool, device=model.device)
    for position in range(1, spec.max_len):
        logits = model(tokens[:, :position])[:, -1].float() / temperature   # (B, vocab)
        logits[:, [spec.pad_id, spec.bos_id]] = float("-inf")
        if position == spec.max_len - 1:  # the last slot can only close the sentence
            logits[:] = float("-inf")
            logits[:, spec.eos_id] = 0.0
        probs = torch.softmax(logits, dim=-1)
        next_token = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1)
        next_token = next_token.to(model.device)
        tokens[:, position] = torch.where(finished, spec.pad_id, next_token)
        finished |= next_token == spec.eos_id
        if finished.all():
            break
    model.train(was_training)
    return tokens


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
