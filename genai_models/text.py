"""Text basics shared by the data step and the text families: a tokenizer, a sentence
splitter and a word-level ``Vocabulary``.

Pure Python (``re``, ``json``, ``collections``): no torch, no orchestration packages.
Everything here is deterministic: the same input gives the same tokens, the same
sentences and the same ids on every machine.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, Sequence

# --- tokenizer ------------------------------------------------------------------------
# Order matters: numbers first (so "4:00" and "1,500" stay whole), then words with
# internal apostrophes/hyphens ("don't", "south-west"), then any other single
# non-space character as its own punctuation token.
_TOKEN = re.compile(
    r"\d+(?:[.,:]\d+)*"  # numbers: 42, 3.5, 1,000, 4:00
    r"|[^\W\d_]+(?:['-][^\W\d_]+)*"  # words (any script's letters)
    r"|[^\w\s]|_"  # punctuation, one character per token
)


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into word, number and punctuation tokens.

    >>> tokenize("Don't panic: it's 4:00pm in south-west Sydney!")
    ["don't", 'panic', ':', "it's", '4:00', 'pm', 'in', 'south-west', 'sydney', '!']
    """
    text = text.lower().replace("\u2019", "'")  # curly apostrophe -> straight
    return _TOKEN.findall(text)


# --- sentence splitter ------------------------------------------------------------------
# A boundary: . ! or ? (plus any closing quotes/brackets), whitespace, then something
# that can start a sentence (an uppercase letter, a digit or an opening quote/bracket).
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[A-Z0-9\"'\u201c\u2018(\[])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st prof sr jr gen col lt sgt capt cmdr gov sen rep rev hon mt ft "
    "vs etc no inc ltd co corp dept est approx fig jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # "J", "U.S", "U.N" (final dot removed)


def _ends_with_abbreviation(text: str) -> bool:
    """True when ``text`` (ending just before a '.') ends with an abbreviation or initials."""
    words = text.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'(\u201c\u2018[")
    return word.lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences with a small, deterministic rule set.

    A sentence ends after ``.``, ``!`` or ``?`` (and closing quotes) when whitespace and
    an uppercase letter, digit or opening quote follow; a ``.`` that ends a common
    abbreviation (Mr., Dr., St., ...) or initials (J., U.S.) does not end a sentence.

    >>> split_sentences('Mr. Smith left. "Why?" she asked. It was 5 p.m. Then rain.')
    ['Mr. Smith left.', '"Why?" she asked.', 'It was 5 p.m. Then rain.']
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if text[match.start()] == "." and _ends_with_abbreviation(text[start : match.start()]):
            continue
        end = match.start() + len(match.group().rstrip())  # keep the closing quotes, drop the space
        sentences.append(text[start:end].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


# --- vocabulary -------------------------------------------------------------------------
class Vocabulary:
    """Word-level vocabulary: four special tokens, then tokens by (-count, token).

    Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.
    """

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    _FORMAT = "genai-vocabulary-v1"

    def __init__(self, tokens: Sequence[str]) -> None:
        """``tokens``: every token in id order, the four specials first."""
        tokens = list(tokens)
        if tuple(tokens[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(f"a vocabulary must start with {list(self.SPECIALS)}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            duplicates = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"duplicate tokens in vocabulary: {duplicates[:10]}")
        self.tokens = tokens
        self._ids = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_freq: int = 1) -> "Vocabulary":
        """Vocabulary of every token seen at least ``min_freq`` times in ``sentences``."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(token for sentence in sentences for token in sentence)
        kept = [(token, n) for token, n in counts.items() if n >= min_freq and token not in cls.SPECIALS]
        kept.sort(key=lambda item: (-item[1], item[0]))
        return cls([*cls.SPECIALS, *(token for token, _ in kept)])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids of ``tokens``; unknown tokens map to ``unk_id``. No bos/eos added."""
        return [self._ids.get(token, self.unk_id) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` up to (not including) the first ``eos``; pad and bos are skipped."""
        tokens = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.tokens)})")
            tokens.append(self.tokens[i])
        return tokens

    def to_json(self) -> str:
        """The vocabulary as a JSON document (stable bytes for the same vocabulary)."""
        return json.dumps({"format": self._FORMAT, "tokens": self.tokens}, ensure_ascii=False, indent=0) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        """Inverse of ``to_json``."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != cls._FORMAT:
            raise ValueError(f"not a vocabulary document (expected format {cls._FORMAT!r})")
        return cls(data["tokens"])
