"""Pure metric functions (numpy / torch / stdlib only).

- ``catalogue``: every metric the pipeline reports, declared once (label, unit, direction, ...).
- ``fid``: feature statistics and the Fréchet distance between them.
- ``sample_quality``: k-NN precision/recall/density/coverage, KID, Inception-style score,
  memorisation, in one feature space.
- ``intervals``: the bootstrap behind every sample-based number's 95% interval.
- ``bleu``: BLEU-n and Self-BLEU-n in the Texygen (nltk sentence_bleu) convention; distinct-n.
- ``likelihood``: bits/dim, perplexity, log-mean-exp, discretized logistic log-probs,
  the uniform-dequantization bound of continuous densities.
"""

from genai_models.metrics.bleu import bleu, distinct_n, self_bleu, sentence_bleu_scores, sentence_self_bleu_scores
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
    "distinct_n",
    "features_to_stats",
    "fid_from_features",
    "frechet_distance",
    "log_mean_exp",
    "nats_to_bits_per_dim",
    "perplexity",
    "self_bleu",
    "sentence_bleu_scores",
    "sentence_self_bleu_scores",
]
