"""BLEU-n and Self-BLEU-n in the Texygen convention, computed from n-gram tables.

Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine
Translation", https://aclanthology.org/P02-1040 ; Self-BLEU: Zhu et al. 2018,
"Texygen: A Benchmarking Platform for Text Generation Models",
https://arxiv.org/abs/1802.01886

Convention (Texygen's): BLEU-n is the *mean over hypotheses* of
``nltk.translate.bleu_score.sentence_bleu(references, hyp, weights=(1/n,)*n,
smoothing_function=SmoothingFunction().method1)``, each hypothesis scored against
*all* reference sentences at once. That means, per hypothesis:

- modified precision p_k: hypothesis k-gram counts clipped by the largest count
  of that k-gram in any single reference, divided by max(1, #hypothesis k-grams);
- method1 smoothing: a zero numerator becomes 0.1 (so p_k = 0.1 / denominator);
- the score is 0 when no unigram matches (this also covers the empty hypothesis);
- brevity penalty against the reference length closest to the hypothesis length,
  ties going to the shorter reference.

The results equal nltk 3.10.4 to float round-off (tests check 1e-9), but nltk
re-counts every reference for every hypothesis. Here the reference side is turned
once into one table per n-gram order (n-gram -> max count over references) plus
the sorted reference lengths, so a hypothesis costs O(its length).

Self-BLEU scores each sentence against every *other* sentence (leave-one-out by
index: a duplicate elsewhere in the list is a reference). The table then keeps,
per n-gram, the largest count, how many sentences attain it and the second
largest count, so removing one sentence is O(1) per n-gram.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from typing import Iterable, Sequence

Tokens = tuple[str, ...]
NgramCounts = list[Counter]  # index k-1 holds the k-gram counts, k = 1..max_n

_EPSILON = 0.1  # nltk SmoothingFunction().method1 default


def _as_token_tuples(sentences: Sequence[Sequence[str]], name: str) -> list[Tokens]:
    """Validate a list of token lists and return it as tuples."""
    if len(sentences) == 0:
        raise ValueError(f"{name} must be a non-empty list of token lists")
    out = []
    for index, sentence in enumerate(sentences):
        if isinstance(sentence, str):
            raise TypeError(
                f"{name}[{index}] is a str ({sentence[:30]!r}); expected a list of "
                "tokens, e.g. sentence.split()"
            )
        out.append(tuple(sentence))
    return out


def _check_max_n(max_n: int) -> None:
    if not isinstance(max_n, int) or max_n < 2:
        raise ValueError(f"max_n must be an int >= 2, got {max_n!r}")


def _ngram_counts(tokens: Tokens, max_n: int) -> NgramCounts:
    """Counts of the 1..max_n-grams of one sentence (empty when it is shorter)."""
    return [Counter(zip(*(tokens[i:] for i in range(k)))) for k in range(1, max_n + 1)]


def _closest_length(sorted_lengths: list[int], hyp_len: int, exact_ok: bool) -> int:
    """Reference length closest to ``hyp_len``, ties to the shorter (as nltk).

    ``sorted_lengths`` holds distinct lengths; ``exact_ok=False`` means a length
    equal to ``hyp_len`` must be skipped (it belonged only to the left-out sentence).
    """
    below_end = bisect_left(sorted_lengths, hyp_len)  # lengths[:below_end] < hyp_len
    above = below_end
    if above < len(sorted_lengths) and sorted_lengths[above] == hyp_len:
        if exact_ok:
            return hyp_len
        above += 1
    below_len = sorted_lengths[below_end - 1] if below_end > 0 else None
    above_len = sorted_lengths[above] if above < len(sorted_lengths) else None
    if above_len is None or (
        below_len is not None and hyp_len - below_len <= above_len - hyp_len
    ):
        assert below_len is not None, "no reference length left"
        return below_len
    return above_len


def _sentence_scores(
    matches: list[int], hyp_len: int, ref_len: int, max_n: int
) -> list[float]:
    """nltk sentence_bleu (method1) for n = 2..max_n from clipped match counts.

    ``matches[k-1]`` is the clipped k-gram match count. Mirrors nltk's arithmetic
    (float(num/den), fsum of w*log p, bp * exp) so results agree to round-off.
    """
    if matches[0] == 0:  # also the empty hypothesis
        return [0.0] * (max_n - 1)
    log_p = []
    for k in range(1, max_n + 1):
        denominator = max(1, hyp_len - k + 1)
        numerator = matches[k - 1] if matches[k - 1] > 0 else _EPSILON
        log_p.append(math.log(numerator / denominator))
    # nltk brevity_penalty(closest_ref_len, hyp_len); hyp_len > 0 here.
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    scores = []
    for n in range(2, max_n + 1):
        weight = 1 / n
        scores.append(bp * math.exp(math.fsum(weight * lp for lp in log_p[:n])))
    return scores


def _columns(per_sentence: Iterable[list[float]], max_n: int) -> dict[int, list[float]]:
    """Per-sentence scores regrouped by order: {n: [score of sentence 0, 1, ...]} for n = 2..max_n."""
    columns: list[list[float]] = [[] for _ in range(max_n - 1)]
    for scores in per_sentence:
        for column, score in zip(columns, scores):
            column.append(score)
    return dict(zip(range(2, max_n + 1), columns))


def _average(columns: dict[int, list[float]]) -> dict[int, float]:
    """Mean over sentences of each BLEU-n."""
    return {n: math.fsum(col) / len(col) for n, col in columns.items()}


def _max_count_tables(references: list[Tokens], max_n: int) -> list[dict]:
    """Per order k: k-gram -> largest count of it in any single reference."""
    tables: list[dict] = [{} for _ in range(max_n)]
    for tokens in references:
        for table, counts in zip(tables, _ngram_counts(tokens, max_n)):
            for gram, count in counts.items():
                if count > table.get(gram, 0):
                    table[gram] = count
    return tables


def bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
) -> dict[int, float]:
    """BLEU-2..BLEU-max_n: the mean over hypotheses of ``sentence_bleu_scores``."""
    return _average(sentence_bleu_scores(hypotheses, references, max_n))


def sentence_bleu_scores(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
) -> dict[int, list[float]]:
    """Each hypothesis's BLEU-2..BLEU-max_n against a shared reference set (Texygen).

    Args:
        hypotheses: H tokenised sentences (each a list of str tokens).
        references: R >= 1 tokenised sentences; every hypothesis is scored against
            all of them.
        max_n: largest n-gram order; scores are returned for n = 2..max_n.

    Returns:
        ``{n: [nltk sentence_bleu of each hypothesis with weights (1/n,)*n and
        SmoothingFunction().method1]}``.

    Raises:
        ValueError: on an empty hypothesis or reference list, or max_n < 2.
        TypeError: if a sentence is a str rather than a list of tokens.
    """
    _check_max_n(max_n)
    hyps = _as_token_tuples(hypotheses, "hypotheses")
    refs = _as_token_tuples(references, "references")
    tables = _max_count_tables(refs, max_n)
    ref_lengths = sorted({len(tokens) for tokens in refs})

    def score(tokens: Tokens) -> list[float]:
        matches = [
            sum(min(count, table.get(gram, 0)) for gram, count in counts.items())
            for table, counts in zip(tables, _ngram_counts(tokens, max_n))
        ]
        ref_len = _closest_length(ref_lengths, len(tokens), exact_ok=True)
        return _sentence_scores(matches, len(tokens), ref_len, max_n)

    return _columns((score(tokens) for tokens in hyps), max_n)


def self_bleu(sentences: Sequence[Sequence[str]], max_n: int = 4) -> dict[int, float]:
    """Self-BLEU-2..max_n: the mean over sentences of ``sentence_self_bleu_scores``."""
    return _average(sentence_self_bleu_scores(sentences, max_n))


def sentence_self_bleu_scores(sentences: Sequence[Sequence[str]], max_n: int = 4) -> dict[int, list[float]]:
    """Self-BLEU-2..max_n of each sentence, scored against all the others (Texygen).

    Leave-one-out is by index: sentence i is never its own reference, but an
    identical sentence at another index is. Higher means less diverse.

    Args:
        sentences: S >= 2 tokenised sentences (each a list of str tokens).
        max_n: largest n-gram order; scores are returned for n = 2..max_n.

    Returns:
        ``{n: [bleu-n of sentences[i] against sentences[:i] + sentences[i+1:] for each i]}``,
        with the same per-sentence score as :func:`bleu`.

    Raises:
        ValueError: on fewer than two sentences, or max_n < 2.
        TypeError: if a sentence is a str rather than a list of tokens.
    """
    _check_max_n(max_n)
    sents = _as_token_tuples(sentences, "sentences")
    if len(sents) < 2:
        raise ValueError(f"self_bleu needs at least 2 sentences, got {len(sents)}")
    all_counts = [_ngram_counts(tokens, max_n) for tokens in sents]

    # Per order: k-gram -> [largest count, #sentences with it, second largest count].
    tables: list[dict[tuple, list[int]]] = [{} for _ in range(max_n)]
    for counts_by_order in all_counts:
        for table, counts in zip(tables, counts_by_order):
            for gram, count in counts.items():
                entry = table.get(gram)
                if entry is None:
                    table[gram] = [count, 1, 0]
                elif count > entry[0]:
                    entry[2], entry[0], entry[1] = entry[0], count, 1
                elif count == entry[0]:
                    entry[1] += 1
                elif count > entry[2]:
                    entry[2] = count
    length_counts = Counter(len(tokens) for tokens in sents)
    sorted_lengths = sorted(length_counts)

    def score(tokens: Tokens, counts_by_order: NgramCounts) -> list[float]:
        matches = []
        for table, counts in zip(tables, counts_by_order):
            matched = 0
            for gram, count in counts.items():
                best, num_best, second = table[gram]
                others_max = second if (count == best and num_best == 1) else best
                matched += min(count, others_max)
            matches.append(matched)
        hyp_len = len(tokens)
        ref_len = _closest_length(sorted_lengths, hyp_len, length_counts[hyp_len] > 1)
        return _sentence_scores(matches, hyp_len, ref_len, max_n)

    return _columns((score(t, c) for t, c in zip(sents, all_counts)), max_n)


def distinct_n(sentences: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n (Li et al. 2016, arXiv:1510.03055): distinct n-grams / all n-grams over all sentences.

    0 when the sentences hold no n-gram at all. Higher means more varied output.
    """
    grams: Counter = Counter()
    for tokens in _as_token_tuples(sentences, "sentences"):
        grams.update(zip(*(tokens[i:] for i in range(n))))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
