"""Text tokenizers (word, char, BPE), JSON Lines sources, and metrics counted in words."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from genai_models.text import BPETokenizer, CharTokenizer, Vocabulary, count_words
from tasks.config import ImageDataConfig, ParamsError, TextDataConfig, parse_params
from tasks.data import encode_sentences, load_text, load_text_manifest, load_tokenizer, prepare_text, text_spec
from tasks.datasets import DataError, check_sources, read_jsonl
from tasks.io import sha256_file
from tests.pipeline_repo import tiny_params

SPLITS = ("train", "val", "test")
LEE_BPE = TextDataConfig(tokenizer="bpe", vocab_size=1000)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def lee_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lee_bpe") / "text"
    prepare_text(LEE_BPE, seed=0, out_dir=out)
    return out


# --- the tokenizers themselves -------------------------------------------------------------
SENTENCES = [["the", "cat", "sat", "on", "the", "mat"], ["the", "dog", "sat", "down"], ["a", "cat", "ran"]] * 4


@pytest.mark.parametrize("tokenizer", [
    Vocabulary.build(SENTENCES, 1), CharTokenizer.build(SENTENCES, 1), BPETokenizer.train(SENTENCES, 40, 2),
], ids=["word", "char", "bpe"])
def test_encode_then_decode_gives_the_words_back(tokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    for words in SENTENCES:
        ids = tokenizer.encode(words)
        assert tokenizer.unk_id not in ids
        assert tokenizer.decode(ids) == words
        # decode stops at eos and skips bos / pad, as the models emit them
        padded = [tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id, ids[0]]
        assert tokenizer.decode(padded) == words
    assert tokenizer.encode([]) == [] and tokenizer.decode([]) == []


def test_char_and_bpe_spell_unseen_words_and_mark_unseen_characters() -> None:
    char, bpe = CharTokenizer.build(SENTENCES, 1), BPETokenizer.train(SENTENCES, 40, 2)
    word = Vocabulary.build(SENTENCES, 1)
    assert word.decode(word.encode(["the", "cast"])) == ["the", "<unk>"]
    for tokenizer in (char, bpe):
        assert tokenizer.decode(tokenizer.encode(["the", "cast"])) == ["the", "cast"]  # c a s t: all seen
        assert tokenizer.decode(tokenizer.encode(["xyz"])) == ["<unk><unk><unk>"]     # x, y, z never seen
    assert char.encode(["a", "cat"]) == [char.vocabulary.encode("a")[0], char.vocabulary.encode("\u2581")[0],
                                         *char.vocabulary.encode("cat")]


def test_bpe_merges_frequent_pairs_into_whole_words_and_respects_vocab_size() -> None:
    bpe = BPETokenizer.train(SENTENCES, 40, 2)
    assert len(bpe) <= 40
    assert bpe.vocabulary.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(bpe.encode(["the"])) == 1 and len(bpe.encode(["sat"])) == 1  # seen 12 and 8 times
    big = BPETokenizer.train(SENTENCES, 1000, 2)
    assert len(big) < 1000  # pairs seen once are never merged (min_freq): fewer ids than asked for


def test_bpe_training_is_deterministic_and_round_trips_through_json() -> None:
    first, again = BPETokenizer.train(SENTENCES, 40, 2), BPETokenizer.train(SENTENCES, 40, 2)
    assert first.to_json() == again.to_json()
    loaded = BPETokenizer.from_json(first.to_json())
    assert loaded.to_json() == first.to_json() and loaded.vocabulary == first.vocabulary
    assert loaded.encode(["the", "cats"]) == first.encode(["the", "cats"])
    with pytest.raises(ValueError, match="vocabulary"):
        CharTokenizer(Vocabulary([*Vocabulary.SPECIALS, "ab"]))


def test_count_words_counts_one_end_of_sentence_per_sentence() -> None:
    assert count_words([["a", "b"], ["c"]]) == 5
    assert count_words([]) == 0


# --- the data step with each tokenizer ------------------------------------------------------
def test_lee_news_with_bpe(lee_bpe: Path) -> None:
    manifest = load_text_manifest(lee_bpe)
    tokenizer = load_tokenizer(lee_bpe)
    assert isinstance(tokenizer, BPETokenizer) and len(tokenizer) == manifest["vocab_size"] == 1000
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["library"].startswith("tokenizers==")
    assert {"tokenizer.json", "vocab.json", "manifest.json", "train.txt"} <= set(manifest["files"]) | {"manifest.json"}
    # the split files hold words; the manifest counts words and tokens separately
    for split in SPLITS:
        sentences = load_text(lee_bpe, split)
        assert manifest["words"][split] == sum(map(len, sentences))
        assert manifest["tokens"][split] == sum(len(tokenizer.encode(s)) for s in sentences) > manifest["words"][split]
    spec = text_spec(lee_bpe, tokenizer)
    longest = max(len(tokenizer.encode(s)) for split in SPLITS for s in load_text(lee_bpe, split))
    assert spec.max_len == longest + 2 and spec.vocab_size == 1000
    encoded = encode_sentences(load_text(lee_bpe, "test"), tokenizer, spec.max_len)  # every sentence fits
    assert (encoded == tokenizer.eos_id).sum(1).tolist() == [1] * encoded.shape[0]
    # the train split spells every word without <unk>; val/test only miss characters never seen in train
    train_ids = [i for s in load_text(lee_bpe, "train") for i in tokenizer.encode(s)]
    assert tokenizer.unk_id not in train_ids
    assert manifest["oov_rate"]["test"] < 0.001


def test_bpe_is_trained_on_the_train_split_only(tmp_path: Path) -> None:
    # three digits each: no number is a prefix of another
    lines = [f"the quick brown fox number {i} jumps" for i in range(100, 140)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = TextDataConfig(dataset="file", path=str(path), tokenizer="bpe", vocab_size=500, min_freq=1)
    prepare_text(cfg, 0, tmp_path / "out")
    tokenizer = load_tokenizer(tmp_path / "out")
    train_numbers = {s[5] for s in load_text(tmp_path / "out", "train")}
    held_out = {s[5] for split in ("val", "test") for s in load_text(tmp_path / "out", split)}
    again = BPETokenizer.train(load_text(tmp_path / "out", "train"), 500, 1)
    assert tokenizer.to_json() == again.to_json()  # exactly what the train split alone gives
    assert len(train_numbers) == 32 and len(held_out) == 8 and not train_numbers & held_out
    # with room to spare every train word becomes one token; a number seen only in val/test never does
    assert all(f"\u2581{n}" in tokenizer.vocabulary for n in train_numbers)
    assert not any(f"\u2581{n}" in tokenizer.vocabulary for n in held_out)


def test_every_tokenizer_sees_the_same_sentences_and_outputs_are_byte_identical(lee_bpe: Path, tmp_path: Path) -> None:
    word = prepare_text(TextDataConfig(tokenizer="word"), 0, tmp_path / "word")
    char = prepare_text(TextDataConfig(tokenizer="char"), 0, tmp_path / "char")
    bpe = load_text_manifest(lee_bpe)
    for split in SPLITS:  # the split files (words) do not depend on the tokenizer
        assert word["files"][f"{split}.txt"] == char["files"][f"{split}.txt"] == bpe["files"][f"{split}.txt"]
    assert word["words"] == word["tokens"] == bpe["words"]
    assert char["tokens"]["test"] > bpe["tokens"]["test"] > word["tokens"]["test"]
    assert word["vocab_size"] > 1000 and char["vocab_size"] < 100
    prepare_text(LEE_BPE, 0, tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(lee_bpe)


def test_tokenizer_settings_are_validated() -> None:
    def text_error(text: dict) -> str:
        params = tiny_params(["transformer_lm"])
        params["data"]["text"] = text
        with pytest.raises(ParamsError) as info:
            parse_params(params)
        return str(info.value)

    assert "vocab_size: only used with tokenizer 'bpe'" in text_error({"tokenizer": "word", "vocab_size": 500})
    assert "data.text.tokenizer" in text_error({"tokenizer": "sentencepiece"})
    assert "data.text.vocab_size" in text_error({"tokenizer": "bpe", "vocab_size": 4})
    assert "text_field: only used with dataset 'jsonl'" in text_error({"dataset": "file", "path": "x",
                                                                       "text_field": "body"})
    assert "needs data.text.path" in text_error({"dataset": "jsonl"})


# --- JSON Lines -----------------------------------------------------------------------------
def test_jsonl_dataset(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    records = [{"id": i, "body": f"Record number {i} has words. And a second sentence {i}!"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    source = read_jsonl(path, "body")
    assert len(source.sentences) == 40 and source.sentences[:2] == ["Record number 0 has words.",
                                                                    "And a second sentence 0!"]
    cfg = TextDataConfig(dataset="jsonl", path=str(path), text_field="body", tokenizer="word", min_freq=1)
    check_sources(ImageDataConfig(), cfg)
    manifest = prepare_text(cfg, 0, tmp_path / "out")
    assert sum(manifest["sentences"].values()) == 40 and manifest["dataset"] == "jsonl"
    assert manifest["source"]["sha256"] == {str(path): sha256_file(path)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine sentence here"}\n{"text": "broken\n', "line 2 is not JSON"),
        ('["a list"]\n', "line 1 is a JSON list"),
        ('{"body": "x"}\n', "line 1 has no field 'text'"),
        ('{"text": 42}\n', "line 1: field 'text' is a JSON int"),
        ('\n  \n', "holds no text"),
    ],
)
def test_bad_jsonl_is_an_error_naming_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        prepare_text(TextDataConfig(dataset="jsonl", path=str(path)), 0, tmp_path / "out")
    assert "bad.jsonl" in str(info.value)
    assert not (tmp_path / "out").exists()


# --- a model, trained and evaluated on BPE tokens; metrics counted in words -------------------
def test_transformer_on_bpe_tokens_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare -> train -> evaluate through the stage commands: samples are words, perplexity per word."""
    from flows.cli import run

    params = tiny_params(["transformer_lm"])
    # short sentences: sampling an untrained model runs to max_len
    params["data"]["text"].update(tokenizer="bpe", vocab_size=300, max_train=300, max_tokens=12)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    run(["prepare", "text"])
    run(["train", "transformer_lm"])
    run(["evaluate", "transformer_lm"])
    metrics = {name: entry["value"] for name, entry in json.loads(Path("metrics/transformer_lm.json").read_text()).items()
               if isinstance(entry, dict) and "value" in entry}
    how = json.loads(Path("evaluation/transformer_lm/provenance.json").read_text())["how"]
    test = load_text(Path("data/text"), "test")
    tokenizer = load_tokenizer(Path("data/text"))
    num_words = sum(len(s) + 1 for s in test)
    num_tokens = sum(len(tokenizer.encode(s)) + 1 for s in test)
    # one total NLL, two denominators: log ppl_word * words == log ppl_token * tokens
    total_from_words = math.log(metrics["perplexity_per_word"]) * num_words
    total_from_tokens = math.log(metrics["perplexity"]) * num_tokens
    assert total_from_words == pytest.approx(total_from_tokens, rel=1e-4)
    assert metrics["nll_per_token"] == pytest.approx(total_from_tokens / num_tokens, rel=1e-4)
    assert metrics["perplexity_per_word"] > metrics["perplexity"]  # more tokens than words
    assert f"{num_words} words" in how["perplexity_per_word"] and "bpe" in how["perplexity_per_word"]
    assert "on words" in how["bleu4"]
    samples = Path("evaluation/transformer_lm/samples.txt").read_text().splitlines()
    assert len(samples) == 20 and not any("\u2581" in line for line in samples)
    assert 0 <= metrics["bleu4"] <= 1 and np.isfinite(metrics["self_bleu4"])


def test_the_tokenizer_comparison_changes_only_data_text() -> None:
    from benchmarks.tokenizers import COCO, distinct, text_block

    assert distinct([["a", "b", "a", "b"], ["c"]], 2) == pytest.approx(2 / 3)  # ab, ba, ab: 2 distinct of 3
    word, bpe = text_block("lee-news", "word"), text_block("coco", "bpe:500")
    assert word["tokenizer"] == "word" and "vocab_size" not in word and word["dataset"] == "lee-news"
    assert bpe == {**word, "dataset": "file", "path": str(COCO), "tokenizer": "bpe", "vocab_size": 500}
    assert TextDataConfig(**bpe).vocab_size == 500 and TextDataConfig(**word).tokenizer == "word"
