"""HMM: the forward algorithm and the E-step against brute-force enumeration of state paths, EM's
monotone likelihood, and the sampler's sentence frequencies against the model's probabilities."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy import stats

from genai_models.base import TextSpec
from genai_models.hmm import HMM, HMMConfig, forward_log_likelihood

SPEC = TextSpec(vocab_size=6, max_len=5, pad_id=0, bos_id=1, eos_id=2)   # words 3, 4, 5


def _tiny_hmm(num_states: int = 3, seed: int = 0, **config) -> HMM:
    torch.manual_seed(seed)
    return HMM(HMMConfig(num_states=num_states, init_scale=1.5, **config), SPEC).double()


def _path_probability(states, tokens, log_initial, log_transitions, log_emissions) -> float:
    log_p = log_initial[states[0]] + log_emissions[states[0], tokens[0]]
    for t in range(1, len(tokens)):
        log_p = log_p + log_transitions[states[t - 1], states[t]] + log_emissions[states[t], tokens[t]]
    return float(log_p.exp())


def _brute_force(tokens, model: HMM) -> float:
    """p(tokens) = sum over every state path of pi B A B ... (K^T terms)."""
    params = [p.detach() for p in model.log_parameters()]
    k = model.config.num_states
    return sum(_path_probability(path, tokens, *params) for path in itertools.product(range(k), repeat=len(tokens)))


def _encode(sentences: list[list[int]], max_len: int = SPEC.max_len) -> torch.Tensor:
    batch = torch.full((len(sentences), max_len), SPEC.pad_id, dtype=torch.long)
    for row, words in enumerate(sentences):
        batch[row, :len(words) + 2] = torch.tensor([SPEC.bos_id, *words, SPEC.eos_id])
    return batch


SENTENCES = [[3], [4, 5], [5, 5, 3], [3, 4, 4], []]


def test_forward_algorithm_equals_brute_force_enumeration():
    model = _tiny_hmm()
    batch = _encode(SENTENCES)
    expected = torch.tensor([_brute_force([*words, SPEC.eos_id], model) for words in SENTENCES], dtype=torch.float64)
    assert torch.allclose(model.log_likelihood(batch), expected.log(), atol=1e-10)


def test_forward_algorithm_stays_finite_on_long_sequences_of_unlikely_words():
    """The scaling keeps 400 tokens of probability ~1e-9 each (log p ~ -8,000) in range."""
    k, v = 4, 50
    log_emissions = torch.log_softmax(torch.randn(k, v, dtype=torch.float64) * 8, 1)
    targets = torch.randint(0, v, (3, 400))
    log_p = forward_log_likelihood(targets, torch.ones_like(targets, dtype=torch.bool),
                                   torch.log_softmax(torch.randn(k, dtype=torch.float64), 0),
                                   torch.log_softmax(torch.randn(k, k, dtype=torch.float64), 1), log_emissions)
    assert torch.isfinite(log_p).all() and (log_p < -1000).all()


def test_expected_counts_are_the_brute_force_posterior_expectations():
    model = _tiny_hmm(num_states=2)
    words = [4, 5, 3]
    tokens = [*words, SPEC.eos_id]
    log_likelihood, (initial, transitions, emissions) = model.expected_counts(_encode([words]))
    params = [p.detach() for p in model.log_parameters()]
    expected_initial, expected_transitions = torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    expected_emissions = torch.zeros(2, SPEC.vocab_size, dtype=torch.float64)
    total = 0.0
    for path in itertools.product(range(2), repeat=len(tokens)):
        p = _path_probability(path, tokens, *params)
        total += p
        expected_initial[path[0]] += p
        for a, b in zip(path, path[1:]):
            expected_transitions[a, b] += p
        for state, token in zip(path, tokens):
            expected_emissions[state, token] += p
    assert float(log_likelihood) == pytest.approx(math.log(total), abs=1e-10)
    pairs = ((initial, expected_initial), (transitions, expected_transitions), (emissions, expected_emissions))
    for got, want in pairs:
        assert torch.allclose(got, want / total, atol=1e-10)


def _training_set(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sentences = [torch.randint(3, 6, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(40)]
    return _encode(sentences, max_len=6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_em_step_never_lowers_the_training_likelihood(seed):
    """Baum-Welch (step size 1, the whole set as the batch, no prior): log p(data) is non-decreasing."""
    model = _tiny_hmm(num_states=4, seed=seed, pseudocount=0.0)
    data = _training_set(seed)
    history = [float(model.em_step(data, step_size=1.0).sum()) for _ in range(40)]
    history.append(float(model.log_likelihood(data).sum()))
    gains = torch.tensor(history).diff()
    assert (gains >= -1e-9).all(), gains
    assert history[-1] > history[0] + 1.0     # and it does learn


def test_with_a_prior_em_never_lowers_the_penalised_likelihood():
    """MAP-EM with pseudocount a: log p(data) + a * (sum of log-parameters) is non-decreasing."""
    model = _tiny_hmm(num_states=4, seed=3, pseudocount=0.5)
    data = _training_set(3)

    def objective() -> float:
        log_initial, log_transitions, log_emissions = model.log_parameters()
        prior = log_initial.sum() + log_transitions.sum() + log_emissions[:, model.emittable].sum()
        return float(model.log_likelihood(data).sum() + 0.5 * prior.detach())

    history = []
    for _ in range(30):
        history.append(objective())
        model.em_step(data, step_size=1.0)
    history.append(objective())
    assert (torch.tensor(history).diff() >= -1e-9).all()


def test_sampling_frequencies_match_the_models_sentence_probabilities():
    model = _tiny_hmm(num_states=3, seed=4)
    num_samples = 20000
    samples = model.sample(num_samples, torch.Generator().manual_seed(0))
    counts = Counter(tuple(row[1:].tolist()) for row in samples)

    # Exact probabilities of what the sampler can produce with max_len 5: up to 2 words then eos, or
    # 3 words and the eos forced into the last slot (the probability of that 3-word prefix).
    params = [p.detach() for p in model.log_parameters()]
    k = model.config.num_states
    probabilities = {}
    for length in range(3):
        for words in itertools.product([3, 4, 5], repeat=length):
            row = (*words, SPEC.eos_id, *[SPEC.pad_id] * (3 - length))
            probabilities[row] = _brute_force([*words, SPEC.eos_id], model)
    for words in itertools.product([3, 4, 5], repeat=3):
        prefix = sum(_path_probability(path, list(words), *params) for path in itertools.product(range(k), repeat=3))
        probabilities[(*words, SPEC.eos_id)] = prefix
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(counts) <= set(probabilities)

    rows = sorted(probabilities, key=probabilities.get, reverse=True)
    frequent = [r for r in rows if probabilities[r] * num_samples >= 5]           # chi-square needs >= 5 expected
    rare = [r for r in rows if r not in frequent]
    observed = [counts[r] for r in frequent]
    expected = [probabilities[r] * num_samples for r in frequent]
    if rare:
        observed.append(sum(counts[r] for r in rare))
        expected.append(sum(probabilities[r] for r in rare) * num_samples)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    uniform = [num_samples / len(observed)] * len(observed)                     # the test can fail
    assert stats.chisquare(observed, uniform).pvalue < 1e-6
