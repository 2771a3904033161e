"""Text basics shared by the data step, the text families and evaluation.

- ``tokenize``: running text -> words (lower-cased word, number and punctuation tokens). Words
  are the unit every text metric counts in (BLEU, Self-BLEU, perplexity per word), whatever
  the model's tokens are.
- ``split_sentences``: running text -> sentences.
- The model's tokens, behind one small interface (``TextTokenizer``): ``encode`` a sentence of
  words into token ids, ``decode`` ids back into words. Three kinds:
  ``Vocabulary`` (``word``: one id per word seen ``min_freq`` times, others ``<unk>``),
  ``CharTokenizer`` (``char``: one id per character, ``\u2581`` between words) and
  ``BPETokenizer`` (``bpe``: byte-pair-encoding subwords trained with Hugging Face ``tokenizers``,
  Sennrich et al., ACL 2016, arXiv:1508.07909).

Every kind has the same four special ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2,
``<unk>`` = 3. Everything here is deterministic: the same input gives the same tokens, the
same sentences, the same vocabularies and the same ids on every machine. No torch, no
orchestration packages; ``tokenizers`` is imported only by ``BPETokenizer``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import ClassVar, Iterable, Protocol, Sequence

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

    Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3. It is also the ``word``
    tokenizer (a ``TextTokenizer``): a token is a word, so ``decode`` gives words.
    """

    kind: ClassVar[str] = "word"

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
        return self.token_strings(ids)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The token strings of ``ids`` up to (not including) the first ``eos``, pad and bos skipped."""
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


# --- tokenizers: words <-> model token ids ---------------------------------------------
class TextTokenizer(Protocol):
    """What the data step, the text families' training and evaluation need from a tokenizer.

    Sentences reach it already split into words (``tokenize``); ``decode`` gives words back, so
    BLEU, Self-BLEU and perplexity per word are counted in the same units for every kind.
    """

    kind: ClassVar[str]  # "word" | "char" | "bpe"
    tokens: list[str]    # every token string, in id order
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    def __len__(self) -> int:
        """Number of token ids (the model's vocabulary size)."""
        ...

    def encode(self, words: Sequence[str]) -> list[int]:
        """Token ids of one sentence of words; no bos/eos added."""
        ...

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The words of ``ids`` up to (not including) the first ``eos``; pad and bos are skipped."""
        ...


WORD_BOUNDARY = "\u2581"  # "▁", as in SentencePiece: marks the start of a word inside char / subword tokens


def _words_from_pieces(pieces: Sequence[str]) -> list[str]:
    """Token strings where ``WORD_BOUNDARY`` starts a word -> the words."""
    return "".join(pieces).replace(WORD_BOUNDARY, " ").split()


class CharTokenizer:
    """One id per character seen ``min_freq`` times in training; ``WORD_BOUNDARY`` between words.

    ``["the", "cat"]`` -> ``t h e ▁ c a t``; a character not in the vocabulary is ``<unk>``.
    """

    kind: ClassVar[str] = "char"
    pad_id, bos_id, eos_id, unk_id = Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.eos_id, Vocabulary.unk_id

    def __init__(self, vocabulary: Vocabulary) -> None:
        long = [t for t in vocabulary.tokens[len(Vocabulary.SPECIALS):] if len(t) != 1]
        if long:
            raise ValueError(f"a character vocabulary holds single characters only, got {long[:5]}")
        self.vocabulary = vocabulary

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_freq: int = 1) -> "CharTokenizer":
        """Characters (and the word boundary) of ``sentences`` seen at least ``min_freq`` times."""
        return cls(Vocabulary.build((WORD_BOUNDARY.join(words) for words in sentences), min_freq))

    def __len__(self) -> int:
        return len(self.vocabulary)

    @property
    def tokens(self) -> list[str]:
        """Every token string in id order (as ``Vocabulary.tokens``)."""
        return self.vocabulary.tokens

    def encode(self, words: Sequence[str]) -> list[int]:
        return self.vocabulary.encode(WORD_BOUNDARY.join(words))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return _words_from_pieces(self.vocabulary.token_strings(ids))

    def to_json(self) -> str:
        return self.vocabulary.to_json()

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        return cls(Vocabulary.from_json(text))


class BPETokenizer:
    """Byte-pair-encoding subwords, trained and applied by Hugging Face ``tokenizers``.

    Each word is prefixed with ``WORD_BOUNDARY`` (the Metaspace convention) and split into the
    subwords of the learnt merges; characters never seen in training become ``<unk>``. The
    boundary is a character, not a suffix added to the last character, which keeps training
    deterministic: the same sentences give byte-identical ``to_json`` on every run (the
    ``</w>`` suffix variant of ``tokenizers`` 0.23 numbers its suffixed tokens in hash order).
    """

    kind: ClassVar[str] = "bpe"
    pad_id, bos_id, eos_id, unk_id = Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.eos_id, Vocabulary.unk_id

    def __init__(self, model) -> None:  # a tokenizers.Tokenizer
        self.model = model
        self.vocabulary = Vocabulary([model.id_to_token(i) for i in range(model.get_vocab_size())])

    @classmethod
    def train(cls, sentences: Iterable[Sequence[str]], vocab_size: int, min_freq: int = 2) -> "BPETokenizer":
        """Learn merges on ``sentences`` (lists of words) until ``vocab_size`` ids (specials included).

        Pairs seen fewer than ``min_freq`` times are never merged, so a small corpus may end with
        fewer ids than ``vocab_size``.
        """
        from tokenizers import Tokenizer, models, trainers

        model = Tokenizer(models.BPE(unk_token=Vocabulary.UNK))
        _set_word_boundaries(model)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_freq,
                                      special_tokens=list(Vocabulary.SPECIALS), show_progress=False)
        model.train_from_iterator((" ".join(words) for words in sentences), trainer)
        return cls(model)

    def __len__(self) -> int:
        return len(self.vocabulary)

    @property
    def tokens(self) -> list[str]:
        """Every token string in id order (as ``Vocabulary.tokens``)."""
        return self.vocabulary.tokens

    def encode(self, words: Sequence[str]) -> list[int]:
        if not words:
            return []
        return self.model.encode(list(words), is_pretokenized=True, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        return _words_from_pieces(self.vocabulary.token_strings(ids))

    def to_json(self) -> str:
        """The ``tokenizers`` JSON document (loadable with ``tokenizers.Tokenizer.from_file``)."""
        return self.model.to_str(pretty=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        tokenizer = cls(Tokenizer.from_str(text))
        if tuple(tokenizer.vocabulary.tokens[:4]) != Vocabulary.SPECIALS:
            raise ValueError(f"a BPE tokenizer must start with {list(Vocabulary.SPECIALS)}")
        return tokenizer


def _set_word_boundaries(model) -> None:
    """Metaspace: every (pre-split) word gets a leading ``WORD_BOUNDARY``; decoding turns it into a space."""
    from tokenizers import decoders, pre_tokenizers

    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme="always", split=False),
    ])
    model.decoder = decoders.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme="always", split=False)


TOKENIZERS: dict[str, type] = {"word": Vocabulary, "char": CharTokenizer, "bpe": BPETokenizer}


def tokenizer_from_json(kind: str, text: str) -> TextTokenizer:
    """Load a tokenizer of ``kind`` from the JSON its ``to_json`` wrote."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_json(text)


def count_words(sentences: Iterable[Sequence[str]]) -> int:
    """Words plus one end of sentence per sentence: the denominator of perplexity per word."""
    return sum(len(words) + 1 for words in sentences)
