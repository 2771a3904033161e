"""Pure metric functions (numpy / torch / stdlib only).

- ``fid``: feature statistics and the Fréchet distance between them.
- ``bleu``: BLEU-n and Self-BLEU-n in the Texygen (nltk sentence_bleu) convention.
- ``likelihood``: bits/dim, perplexity, log-mean-exp, discretized logistic log-probs,
  the uniform-dequantization bound of continuous densities.
"""

from genai_models.metrics.bleu import bleu, self_bleu
from genai_models.metrics.fid import features_to_stats, fid_from_features, frechet_distance
from genai_models.metrics.likelihood import (
    dequantized_log_likelihood,
    discretized_logistic_log_prob,
    log_mean_exp,
    nats_to_bits_per_dim,
    perplexity,
)

__all__ = [
    "bleu",
    "dequantized_log_likelihood",
    "discretized_logistic_log_prob",
    "features_to_stats",
    "fid_from_features",
    "frechet_distance",
    "log_mean_exp",
    "nats_to_bits_per_dim",
    "perplexity",
    "self_bleu",
]
