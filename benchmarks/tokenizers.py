"""Word vs subword tokens for the Transformer LM: what picks ``data.text.tokenizer``'s default.

For each (corpus, tokenizer) it runs the real stage commands in a scratch folder under
``build/tokenizers/`` (``python -m flows.cli prepare text``, ``train transformer_lm``,
``evaluate transformer_lm``) with the project's ``params.yaml`` changed only in ``data.text``,
then prints one table: perplexity per word and per token, BLEU-4, Self-BLEU-4, distinct-2 and
``<unk>`` in the evaluation's generated sentences, and the training step time.

    python -m benchmarks.tokenizers                                  # lee-news and COCO, word and bpe
    python -m benchmarks.tokenizers --corpora lee-news --tokenizers word bpe:1000 bpe:2000

Step time is measured apart from training, interleaved (word, bpe, word, bpe, ...) on the
trained models of each corpus, so a loaded machine slows every tokenizer alike; the training
step's own wall time is shown too. COCO captions come from ``../shared`` (skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS_DIR, machine_info
from tasks.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "build" / "tokenizers"
COCO = REPO.parent / "shared" / "data" / "text" / "coco_captions" / "image_coco.txt"
CORPORA = {"lee-news": {"dataset": "lee-news"}, "coco": {"dataset": "file", "path": str(COCO)}}


def text_block(corpus: str, tokenizer: str) -> dict:
    """``data.text`` for a corpus and ``word`` | ``char`` | ``bpe[:vocab_size]``."""
    block = dict(yaml.safe_load((REPO / "params.yaml").read_text())["data"]["text"])
    block = {k: v for k, v in block.items() if k not in ("dataset", "path", "vocab_size", "tokenizer")}
    kind, _, size = tokenizer.partition(":")
    block.update(CORPORA[corpus], tokenizer=kind)
    if kind == "bpe":
        block["vocab_size"] = int(size or 2000)
    return block


def run_steps(folder: Path, corpus: str, tokenizer: str) -> None:
    """The three stage commands, in ``folder``, on the project's code (PYTHONPATH) and params."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["text"] = text_block(corpus, tokenizer)
    params["families"] = {"transformer_lm": params["families"]["transformer_lm"]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for step in (["prepare", "text"], ["train", "transformer_lm"], ["evaluate", "transformer_lm"]):
        print(f"[{corpus} {tokenizer}] python -m flows.cli {' '.join(step)}", flush=True)
        subprocess.run([sys.executable, "-m", "flows.cli", *step], cwd=folder, env=env, check=True,
                       stdout=subprocess.DEVNULL)


def generated_words(folder: Path) -> list[list[str]]:
    """The sentences evaluation scored (same count, batch size and seed), as words."""
    from tasks import data
    from tasks.checkpoints import load_model
    from tasks.config import load_params
    from tasks.evaluate import draw_samples

    config = load_params(folder / "params.yaml")
    model = load_model(folder / "models" / "transformer_lm" / "model.pt", torch.device("cpu"))
    tokenizer = data.load_tokenizer(folder / "data" / "text")
    rows = draw_samples(model, config.evaluate.num_text_samples, config.evaluate.batch_size, config.seed)
    return [tokenizer.decode(row.tolist()) for row in rows]


def distinct(sentences: list[list[str]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sentences (Li et al., NAACL 2016)."""
    grams = [tuple(s[i:i + n]) for s in sentences for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def spelling_model(words: list[str]):
    """-log p(word) in nats under a character bigram model of ``words`` (add-one smoothing, end marker)."""
    from collections import Counter

    pairs, contexts = Counter(), Counter()
    for word in words:
        chars = ["<w>", *word, "</w>"]
        pairs.update(zip(chars, chars[1:]))
        contexts.update(chars[:-1])
    alphabet = {c for word in words for c in word} | {"</w>", "<other>"}

    def cost(word: str) -> float:
        chars = ["<w>", *(c if c in alphabet else "<other>" for c in word), "</w>"]
        return -sum(math.log((pairs[(a, b)] + 1) / (contexts[a] + len(alphabet))) for a, b in zip(chars, chars[1:]))

    return cost


def open_vocabulary_perplexity(folder: Path, perplexity_per_word: float) -> float | None:
    """A word model's perplexity per word when each ``<unk>`` must also spell its word.

    ``<unk>`` stands for every word outside the vocabulary, so the word model's own number is not
    an open-vocabulary perplexity like a subword model's: it never pays for the spelling of the
    test words it does not know (the manifest's ``oov_rate``). Here each ``<unk>`` test word also pays
    -log p(word | not in the vocabulary) under a character bigram model of all train words
    (``spelling_model``), renormalised over the strings that are not vocabulary words:
    p(w) / (1 - sum of p(v) over the vocabulary's words). Word model + speller is then a proper
    distribution over word strings, as a subword model is (the approach of Mielke & Eisner, AAAI
    2019, with a simpler speller). Returns None for other tokenizers.
    """
    from genai_models.text import count_words
    from tasks import data

    manifest = json.loads((folder / "data" / "text" / "manifest.json").read_text())
    if manifest["tokenizer"]["kind"] != "word":
        return None
    tokenizer = data.load_tokenizer(folder / "data" / "text")
    cost = spelling_model([w for s in data.load_text(folder / "data" / "text", "train") for w in s])
    in_vocabulary = sum(math.exp(-cost(w)) for w in tokenizer.tokens[len(tokenizer.SPECIALS):])
    test = data.load_text(folder / "data" / "text", "test")
    num_words = count_words(test)  # words + one eos per sentence, as evaluation counts
    unknown = [w for s in test for w in s if tokenizer.encode([w]) == [tokenizer.unk_id]]
    spelling = sum(cost(w) + math.log(1 - in_vocabulary) for w in unknown)
    return math.exp((math.log(perplexity_per_word) * num_words + spelling) / num_words)


def step_seconds(folders: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of one training step of each trained model, interleaved."""
    from genai_models.base import Precision
    from tasks.checkpoints import load_model
    from tasks.config import load_params
    from tasks.train import _settings, batch_indices, load_training_data

    setups = {}
    for name, folder in folders.items():
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            config = load_params("params.yaml")
            train = config.families["transformer_lm"].train
            model = load_model(Path("models/transformer_lm/model.pt"), torch.device("cpu")).train()
            tokens = load_training_data("text").train
        finally:
            os.chdir(cwd)
        settings = _settings(train)
        optimizers = model.configure_optimizers(settings)
        batches = [tokens[batch_indices(s, tokens.shape[0], train.batch_size, config.seed)] for s in range(repeats)]
        setups[name] = (model, optimizers, settings, batches)
    wall = {name: [] for name in folders}
    cpu = {name: [] for name in folders}
    precision = Precision(torch.device("cpu"), enabled=False)
    for i in range(repeats):
        for name, (model, optimizers, settings, batches) in setups.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.training_step(batches[i], optimizers, precision, settings)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median_ms = lambda times: 1000 * statistics.median(times[2:])  # noqa: E731 (the first two warm up)
    return {name: {"wall_ms": median_ms(wall[name]), "cpu_ms": median_ms(cpu[name])} for name in folders}


def row(corpus: str, tokenizer: str, folder: Path) -> dict:
    metrics = json.loads((folder / "metrics" / "transformer_lm.json").read_text())
    manifest = json.loads((folder / "data" / "text" / "manifest.json").read_text())
    summary = json.loads((folder / "models" / "transformer_lm" / "summary.json").read_text())
    words = generated_words(folder)
    with_unk = sum("<unk>" in " ".join(s) for s in words)
    return {
        "corpus": corpus, "tokenizer": tokenizer, "vocab_size": manifest["vocab_size"],
        "tokens_per_word": round(manifest["tokens"]["test"] / manifest["words"]["test"], 3),
        "max_len": manifest["max_len"], "test_unk_rate": manifest["oov_rate"]["test"],
        "perplexity_per_word": metrics["perplexity_per_word"], "perplexity_per_token": metrics["perplexity"],
        "perplexity_per_word_open": open_vocabulary_perplexity(folder, metrics["perplexity_per_word"]),
        "bleu4": metrics["bleu4"], "self_bleu4": metrics["self_bleu4"], "distinct2": round(distinct(words, 2), 4),
        "samples": len(words), "samples_with_unk": with_unk,
        "unk_per_sample": round(sum(" ".join(s).count("<unk>") for s in words) / len(words), 3),
        "train_step_ms_in_training": round(1000 * summary["train_seconds"] / summary["steps"], 1),
        "best_step": summary.get("best_step"),
    }


def markdown(rows: list[dict]) -> str:
    columns = ["corpus", "tokenizer", "vocab_size", "tokens_per_word", "test_unk_rate", "perplexity_per_word",
               "perplexity_per_word_open", "perplexity_per_token",
               "bleu4", "self_bleu4", "distinct2", "samples_with_unk", "unk_per_sample", "step_ms_wall",
               "step_ms_cpu", "train_step_ms_in_training", "best_step"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenizers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--tokenizers", nargs="+", default=["word", "bpe:2000"],
                        help="word, char, or bpe:VOCAB_SIZE (default: word bpe:2000)")
    parser.add_argument("--step-repeats", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--reuse", action="store_true", help="reuse trained folders under build/tokenizers")
    args = parser.parse_args(argv)
    rows = []
    for corpus in args.corpora:
        if corpus == "coco" and not COCO.is_file():
            print(f"skipping coco: {COCO} is absent")
            continue
        folders = {}
        for tokenizer in args.tokenizers:
            folder = SCRATCH / f"{corpus}-{tokenizer.replace(':', '-')}"
            if not (args.reuse and (folder / "metrics" / "transformer_lm.json").exists()):
                run_steps(folder, corpus, tokenizer)
            folders[tokenizer] = folder
        steps = step_seconds(folders, args.step_repeats)
        for tokenizer, folder in folders.items():
            rows.append({**row(corpus, tokenizer, folder), **{f"step_ms_{k[:-3]}": round(v, 1)
                                                               for k, v in steps[tokenizer].items()}})
    table = markdown(rows)
    print(table)
    command = " ".join(["python", "-m", "benchmarks.tokenizers", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "machine": machine_info(), "params": "params.yaml with data.text changed",
            "how": {"perplexity_per_word": "exp(total test NLL / (words + one eos per sentence))",
                    "perplexity_per_word_open": "word models: + -log p(spelling | not a vocabulary word) of each <unk> "
                                                "test word, character bigram model of the train words (add-one), "
                                                "renormalised over non-vocabulary strings; others: None",
                    "distinct2": "distinct word bigrams / all word bigrams of the evaluation's generated sentences",
                    "step_ms": "median of --step-repeats training steps (first 2 dropped), models interleaved"}}
    atomic_write_text(RESULTS_DIR / "tokenizers.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(RESULTS_DIR / "tokenizers.md", f"`{meta['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
