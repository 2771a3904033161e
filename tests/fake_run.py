"""A finished run written by hand: what train, evaluate and features leave behind, for report tests.

``make_fake_run`` writes three families (two image, one text) with known metrics, intervals and
hostile text into the current directory, and returns the parsed config the report step takes.
"""

from __future__ import annotations

import io
import math

import yaml
from PIL import Image

from tasks import paths
from tasks.config import PipelineConfig, parse_params
from tasks.io import atomic_write_json
from tests.conftest import REPO_ROOT

HOSTILE = [
    "<script>alert('x')</script> the market fell",
    '<img src=x onerror="alert(1)"> prices rose',
    '<a href="javascript:alert(1)">click</a> today',
]

IMAGE_METRICS = {
    # dcgan: clearly the better FID (intervals apart); precision tied with the vae (intervals overlap).
    "dcgan": {"fid": {"value": 20.0, "low": 18.0, "high": 22.0, "floor": 5.0, "ceiling": 280.0},
              "precision": {"value": 0.8, "low": 0.7, "high": 0.9, "floor": 0.95, "ceiling": 0.0},
              "recall": {"value": 0.6, "low": 0.55, "high": 0.65, "floor": 0.96, "ceiling": 0.0},
              "coverage": {"value": 0.5, "low": 0.45, "high": 0.55, "floor": 0.97, "ceiling": 0.0},
              "memorization": {"value": 0.4, "low": 0.35, "high": 0.45, "floor": 1.0, "ceiling": 2.0}},
    "vae": {"fid": {"value": 30.0, "low": 28.0, "high": 32.0, "floor": 5.0, "ceiling": 300.0},
            "precision": {"value": 0.75, "low": 0.65, "high": 0.85, "floor": 0.95, "ceiling": 0.0},
            "recall": {"value": 0.3, "low": 0.25, "high": 0.35, "floor": 0.96, "ceiling": 0.0},
            "coverage": {"value": 0.2, "low": 0.15, "high": 0.25, "floor": 0.97, "ceiling": 0.0},
            "memorization": {"value": 1.05, "low": 0.95, "high": 1.15, "floor": 1.0, "ceiling": 2.0},
            "nll_iwae_nats": {"value": 700.0}, "bits_per_dim_iwae": {"value": 1.29},
            "nll_bits_per_dim": {"value": 1.29}},
}
TEXT_METRICS = {"bleu2": {"value": 0.5, "low": 0.45, "high": 0.55, "floor": 0.4},
                "self_bleu2": {"value": 0.4, "low": 0.35, "high": 0.45, "floor": 0.3},
                "perplexity": {"value": 90.0}, "nll_per_token": {"value": math.log(90.0)}}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _family(name: str, modality: str, metrics: dict, sentences: list[str] | None = None) -> None:
    model_dir, eval_dir = paths.model_dir(name), paths.evaluation_dir(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    curve = "step,loss,samples_per_s,train_seconds,val_loss,fid,precision,recall\n" \
            "1,3.5,10,0.5,3.6,300,0.1,0.1\n2,2.5,10,1.0,2.7,100,0.5,0.4\n"
    (model_dir / "loss.csv").write_text(curve)
    atomic_write_json(model_dir / "summary.json", {
        "step": f"train {name}", "wall_s": 1.0, "peak_rss_mb": 100.0, "device": "cpu", "precision": "fp32",
        "steps": 2, "train_seconds": 0.5 if name == "vae" else 1.5, "train_samples_per_s": 64.0, "parameters": 1000})
    atomic_write_json(eval_dir / "provenance.json", {
        "family": name, "modality": modality, "how": {k: f"made <b>{k}</b>" for k in metrics},
        "sampling": "draws from the model", "plain_sampling": "draws from the model", "bootstrap_replicates": 200,
        "step": f"evaluate {name}", "wall_s": 1.0, "peak_rss_mb": 100.0})
    if sentences is not None:
        (eval_dir / "samples.txt").write_text("\n".join(sentences) + "\n")
    else:
        (eval_dir / "samples.png").write_bytes(_png())
    atomic_write_json(paths.metrics_file(name), metrics)


def fake_params() -> dict:
    """The project's params.yaml with the fake run's three families."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["families"] = {k: v for k, v in params["families"].items() if k in ("vae", "dcgan", "transformer_lm")}
    return params


def make_fake_run(image_metrics: dict | None = None) -> PipelineConfig:
    """Write the fake run into the working directory (``image_metrics``: in place of ``IMAGE_METRICS``);
    returns its config."""
    params = fake_params()
    params["data"]["text"]["path"] = "<script>alert('path')</script>"
    for modality in ("image", "text"):
        atomic_write_json(paths.data_dir(modality) / "manifest.json", {"dataset": "<i>fixture</i>"})
    atomic_write_json(paths.FEATURE_EXTRACTOR / "summary.json", {
        "step": "features", "wall_s": 2.0, "description": "a <b>classifier</b>", "test_accuracy": 0.99})
    for name, metrics in (image_metrics or IMAGE_METRICS).items():
        _family(name, "image", metrics)
    _family("transformer_lm", "text", TEXT_METRICS, HOSTILE)
    return parse_params(params)
