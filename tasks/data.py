"""The data step: turn a source (``tasks.datasets``) into split files, and load them back.

Prepared image data (``out_dir``)::

    {train,val,test}_images.npy   uint8 (N, C, H, W); with ``binarize: dynamic`` val and test
                                  hold 0/255 only (binarized once), train keeps its grey levels
    {train,val,test}_labels.npy   int64 (N,)
    manifest.json                 source + checksums, counts, class balance, config

Prepared text data::

    {train,val,test}.txt          one sentence of words per line (``genai_models.text.tokenize``), joined by " "
    vocab.json                    the model's tokens in id order (``Vocabulary`` JSON), built from train
    tokenizer.json                bpe only: the Hugging Face ``tokenizers`` file (merges learnt on train)
    manifest.json                 source + checksums, counts (sentences, words, tokens), tokenizer,
                                  vocabulary size, sequence length, <unk> rates, config

The split files hold words, whatever ``data.text.tokenizer`` is: models read them through the
tokenizer (``load_tokenizer``, ``encode_sentences``), metrics count words.

Same config, seed and source => byte-identical files. The output folder is replaced
as a whole and only when everything succeeded (``tasks.io.replace_directory``).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch

from genai_models.base import ImageSpec, TextSpec
from genai_models.text import BPETokenizer, CharTokenizer, TextTokenizer, Vocabulary, tokenize, tokenizer_from_json
from tasks.config import FOLDER_ONLY
from tasks.datasets import (
    DataError, ImageSource, TextSource, check_image_folder, read_image_source, read_text_source,
)
from tasks.io import atomic_write_json, atomic_write_text, replace_directory, sha256_file

if TYPE_CHECKING:
    from tasks.config import ImageDataConfig, PipelineConfig, TextDataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
BPE_FILE = "tokenizer.json"


def prepare(modality: Literal["image", "text"], config: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Prepare the image or text data named in ``config.data``; returns the manifest."""
    if modality == "image":
        images = config.data.images
        if images.dataset == "folder":  # layout, headers and a feature space for it, before any work
            check_image_folder(images, Path(images.root or ""), config.features.extractor)
        return prepare_images(images, config.seed, out_dir)
    if modality == "text":
        return prepare_text(config.data.text, config.seed, out_dir)
    raise ValueError(f"unknown modality {modality!r}; expected 'image' or 'text'")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index arrays: one per fraction, then the rest; every class is split in proportion.

    Part ``i`` holds round(N * fractions[i]) indices in total, shared out over the classes
    by largest remainder, so the totals do not drift with the number of classes.
    """
    classes, class_sizes = np.unique(labels, return_counts=True)  # sorted: ``rng`` is used in a fixed order
    quotas = [_largest_remainder(class_sizes, fraction) for fraction in fractions]
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c, label in enumerate(classes):
        indices = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for part, quota in zip(parts, quotas):
            part.append(indices[start : start + quota[c]])
            start += quota[c]
        parts[-1].append(indices[start:])
    return [rng.permutation(np.concatenate(part)) for part in parts]


def _largest_remainder(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Integer per-class counts summing to round(total * fraction), each near size * fraction."""
    exact = class_sizes * fraction
    counts = np.floor(exact).astype(np.int64)
    missing = int(class_sizes.sum() * fraction + 0.5) - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:missing]] += 1
    return counts


# --- images -----------------------------------------------------------------------------
def split_images(source: ImageSource, cfg: ImageDataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/val/test (images, labels): val from train (and test too where the source has none)."""
    rng = np.random.default_rng(seed)
    x, y = source.train_images, source.train_labels
    if source.test_images is not None and source.test_labels is not None:
        val, train = stratified_split(y, [cfg.val_fraction], rng)
        splits = {"train": (x[train], y[train]), "val": (x[val], y[val]),
                  "test": (source.test_images, source.test_labels)}
    else:
        val, test, train = stratified_split(y, [cfg.val_fraction, cfg.test_fraction], rng)
        splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
    if cfg.max_train is not None:
        splits["train"] = tuple(a[: cfg.max_train] for a in splits["train"])  # train is already shuffled
    for split, (images, _) in splits.items():
        if len(images) == 0:
            raise DataError(f"{source.dataset}: the {split} split is empty "
                            f"({len(y)} training images in {source.location})")
    return splits


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 images -> uint8 0/255 images, each pixel white with probability level / 255."""
    noise = torch.rand(images.shape, generator=generator, device=generator.device).to(images.device)
    return (noise * 255 < images).to(torch.uint8) * 255


def is_dynamically_binarized(data_dir: Path) -> bool:
    """Whether prepared image data asks for a fresh binarization of every training batch."""
    return load_image_manifest(data_dir)["config"].get("binarize", "none") == "dynamic"


def prepare_images(cfg: ImageDataConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """Read ``cfg.dataset``, split it with ``seed`` and write the split files to ``out_dir``.

    Returns the manifest. Any source problem raises ``DataError`` before ``out_dir`` is touched.
    """
    started = time.perf_counter()
    source = read_image_source(cfg)
    splits = split_images(source, cfg, seed)
    if cfg.binarize == "dynamic":  # evaluation data is binarized once; train per batch (tasks.train)
        for offset, split in enumerate(("val", "test"), start=1):
            images, labels = splits[split]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + offset)
            splits[split] = (binarize(torch.from_numpy(images), generator).numpy(), labels)
    source_sha = {name: sha256_file(path) for name, path in sorted(source.files.items())}
    all_labels = np.concatenate([labels for _, labels in splits.values()])
    folder = cfg.dataset == "folder"
    manifest: dict[str, Any] = {
        "kind": "image",
        "dataset": source.dataset,
        "source": {"location": source.location, "urls": source.urls, "sha256": source_sha, **source.details},
        "seed": seed,
        # Keys only dataset 'folder' reads are left out elsewhere: manifests of the other data sets stay as they were.
        "config": cfg.model_dump(mode="json", exclude=None if folder else set(FOLDER_ONLY)),
        "image_shape": list(splits["train"][0].shape[1:]),
        "num_classes": int(all_labels.max()) + 1,
        **({"classes": source.classes} if folder else {}),
        "counts": {split: len(labels) for split, (_, labels) in splits.items()},
        "class_balance": {split: _class_balance(labels) for split, (_, labels) in splits.items()},
    }
    with replace_directory(out_dir) as tmp:
        for split, (images, labels) in splits.items():
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / f"{split}_labels.npy", np.ascontiguousarray(labels, dtype=np.int64))
        manifest["files"] = {path.name: sha256_file(path) for path in sorted(tmp.iterdir())}
        atomic_write_json(tmp / MANIFEST, manifest)
    counts = "/".join(str(n) for n in manifest["counts"].values())
    log.info("%s: %s images written to %s (%.1f s)", source.dataset, counts, out_dir, time.perf_counter() - started)
    return manifest


def _class_balance(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(values, counts)}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the data step first") from None


def load_image_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest written by ``prepare_images``."""
    return _read_json(Path(data_dir) / MANIFEST)


def load_images(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of one split of prepared image data."""
    _check_split(split)
    data_dir = Path(data_dir)
    try:
        images = np.load(data_dir / f"{split}_images.npy")
        labels = np.load(data_dir / f"{split}_labels.npy")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err.filename} not found: run the data step first") from None
    assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(labels), (images.shape, labels.shape)
    return images, labels


def image_spec(data_dir: Path) -> ImageSpec:
    """Channels, height and width of prepared image data."""
    channels, height, width = load_image_manifest(data_dir)["image_shape"]
    return ImageSpec(channels=channels, height=height, width=width)


# --- text -------------------------------------------------------------------------------
def split_sentence_list(
    sentences: list[list[str]], cfg: TextDataConfig, seed: int, dataset: str
) -> dict[str, list[list[str]]]:
    """Shuffle with ``seed`` and cut into val, test and (the rest, capped by max_train) train."""
    order = np.random.default_rng(seed).permutation(len(sentences))
    num_val = int(len(sentences) * cfg.val_fraction + 0.5)
    num_test = int(len(sentences) * cfg.test_fraction + 0.5)
    parts = {"val": order[:num_val], "test": order[num_val : num_val + num_test], "train": order[num_val + num_test :]}
    if cfg.max_train is not None:
        parts["train"] = parts["train"][: cfg.max_train]
    for split, indices in parts.items():
        if len(indices) == 0:
            raise DataError(f"{dataset}: the {split} split is empty ({len(sentences)} sentences after filtering)")
    return {split: [sentences[i] for i in parts[split]] for split in SPLITS}


def _unk_rate(encoded: list[list[int]], unk_id: int) -> float:
    """Share of tokens that are ``<unk>``: words (word), characters (char) or subwords (bpe) unseen in train."""
    tokens = [token for ids in encoded for token in ids]
    return round(sum(token == unk_id for token in tokens) / max(len(tokens), 1), 6)


def build_tokenizer(cfg: TextDataConfig, train: list[list[str]]) -> TextTokenizer:
    """The ``data.text.tokenizer`` of ``cfg``, built from the train split's sentences only."""
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(train, cfg.vocab_size, cfg.min_freq)
    if cfg.tokenizer == "char":
        return CharTokenizer.build(train, cfg.min_freq)
    return Vocabulary.build(train, cfg.min_freq)


def _tokenizer_description(tokenizer: TextTokenizer, cfg: TextDataConfig) -> dict[str, Any]:
    import importlib.metadata

    description: dict[str, Any] = {"kind": tokenizer.kind, "vocab_size": len(tokenizer), "min_freq": cfg.min_freq,
                                   "trained_on": "train split"}
    if tokenizer.kind == "bpe":
        description |= {"requested_vocab_size": cfg.vocab_size,
                        "library": f"tokenizers=={importlib.metadata.version('tokenizers')}",
                        "word_boundary": "Metaspace (U+2581 starts every word)"}
    return description


_WORD = re.compile(r"\S+")


def _more_words_than(sentence: str, limit: int) -> bool:
    """Whether ``sentence`` has more than ``limit`` whitespace-separated words, looking at most at limit + 1.

    Every word gives at least one token, so such a sentence is too long whatever its tokens;
    checking first keeps a 200 MB one-line file from being tokenized whole.
    """
    return next(itertools.islice(_WORD.finditer(sentence), limit, None), None) is not None


def tokenize_source(source: TextSource, cfg: TextDataConfig) -> list[list[str]]:
    """Tokenized sentences of ``source`` with min_tokens <= length <= max_tokens."""
    kept = [tokens for sentence in source.sentences if not _more_words_than(sentence, cfg.max_tokens)
            and cfg.min_tokens <= len(tokens := tokenize(sentence)) <= cfg.max_tokens]
    if not kept:
        raise DataError(f"{source.dataset}: no sentence of {cfg.min_tokens}..{cfg.max_tokens} tokens in "
                        f"{source.location} ({len(source.sentences)} sentences read)")
    return kept


def prepare_text(cfg: TextDataConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """Read ``cfg.dataset``, split into words, filter, split with ``seed``; build the tokenizer on
    train; write the splits (words), the tokenizer files and the manifest.

    Returns the manifest. Any source problem raises ``DataError`` before ``out_dir`` is touched.
    """
    started = time.perf_counter()
    source = read_text_source(cfg)
    splits = split_sentence_list(tokenize_source(source, cfg), cfg, seed, source.dataset)
    tokenizer = build_tokenizer(cfg, splits["train"])
    encoded = {split: [tokenizer.encode(words) for words in sentences] for split, sentences in splits.items()}
    manifest: dict[str, Any] = {
        "kind": "text",
        "dataset": source.dataset,
        "source": {"location": source.location,
                   "sha256": {name: sha256_file(path) for name, path in sorted(source.files.items())}},
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "tokenizer": _tokenizer_description(tokenizer, cfg),
        "max_tokens": cfg.max_tokens,
        # bos + the longest sentence's tokens + eos: the models' sequence length
        "max_len": max(len(ids) for ids_list in encoded.values() for ids in ids_list) + 2,
        "sentences": {split: len(sentences) for split, sentences in splits.items()},
        "words": {split: sum(map(len, sentences)) for split, sentences in splits.items()},
        "tokens": {split: sum(map(len, ids_list)) for split, ids_list in encoded.items()},
        "vocab_size": len(tokenizer),
        "oov_rate": {split: _unk_rate(encoded[split], tokenizer.unk_id) for split in ("val", "test")},
    }
    vocabulary = tokenizer if isinstance(tokenizer, Vocabulary) else tokenizer.vocabulary
    with replace_directory(out_dir) as tmp:
        for split, sentences in splits.items():
            atomic_write_text(tmp / f"{split}.txt", "".join(" ".join(tokens) + "\n" for tokens in sentences))
        atomic_write_text(tmp / VOCAB, vocabulary.to_json())
        if isinstance(tokenizer, BPETokenizer):
            atomic_write_text(tmp / BPE_FILE, tokenizer.to_json())
        manifest["files"] = {path.name: sha256_file(path) for path in sorted(tmp.iterdir())}
        atomic_write_json(tmp / MANIFEST, manifest)
    counts = "/".join(str(n) for n in manifest["sentences"].values())
    log.info("%s: %s sentences, %s tokenizer of %d tokens written to %s (%.1f s)",
             source.dataset, counts, tokenizer.kind, len(tokenizer), out_dir, time.perf_counter() - started)
    return manifest


def load_text_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest written by ``prepare_text``."""
    return _read_json(Path(data_dir) / MANIFEST)


def load_text(data_dir: Path, split: str) -> list[list[str]]:
    """Tokenized sentences of one split of prepared text data."""
    _check_split(split)
    path = Path(data_dir) / f"{split}.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the data step first") from None
    return [line.split(" ") for line in lines]


def load_tokenizer(data_dir: Path) -> TextTokenizer:
    """The tokenizer written by ``prepare_text`` (the kind its manifest names): words <-> token ids."""
    data_dir = Path(data_dir)
    kind = load_text_manifest(data_dir).get("tokenizer", {}).get("kind", "word")
    path = data_dir / (BPE_FILE if kind == "bpe" else VOCAB)
    try:
        return tokenizer_from_json(kind, path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the data step first") from None


load_vocab = load_tokenizer  # the name this had when every tokenizer was a word vocabulary


def text_spec(data_dir: Path, tokenizer: TextTokenizer) -> TextSpec:
    """Vocabulary size, sequence length (bos + longest sentence + eos) and special ids of prepared text."""
    manifest = load_text_manifest(data_dir)
    max_len = manifest.get("max_len", manifest["max_tokens"] + 2)
    return TextSpec(vocab_size=len(tokenizer), max_len=max_len,
                    pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def encode_sentences(sentences: Sequence[Sequence[str]], tokenizer: TextTokenizer, max_len: int) -> torch.Tensor:
    """Token ids (N, max_len) of sentences of words: ``bos``, the tokens, ``eos``, then ``pad``."""
    batch = torch.full((len(sentences), max_len), tokenizer.pad_id, dtype=torch.long)
    for row, words in enumerate(sentences):
        ids = [tokenizer.bos_id, *tokenizer.encode(words), tokenizer.eos_id]
        if len(ids) > max_len:
            raise ValueError(f"sentence {row} has {len(ids) - 2} tokens; "
                             f"max_len {max_len} leaves room for {max_len - 2}")
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return batch
