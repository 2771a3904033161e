"""params.yaml -> typed config: the shipped file is valid, bad values are named."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from genai_models.registry import REGISTRY
from tasks.config import ParamsError, load_params, parse_params
from tests.conftest import REPO_ROOT


@pytest.fixture
def raw_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid(raw_params):
    config = parse_params(raw_params)
    assert list(config.families) == list(REGISTRY)  # every family, in the report's order
    assert config.family_model_config("vae").latent_dim == raw_params["families"]["vae"]["model"]["latent_dim"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p["families"]["vae"]["train"].update(learning_rate=-0.1),
         "families.vae.train.learning_rate: Input should be greater than 0 (got -0.1)"),
        (lambda p: p["families"].update(flowgan=p["families"]["vae"]), "unknown family 'flowgan'"),
        (lambda p: p.update(sead=1), "sead: unknown key"),
        (lambda p: p["families"]["dcgan"]["model"].update(latent_dimension=3),
         "families.dcgan.model.latent_dimension: unknown key"),
        (lambda p: p["families"]["vae"]["model"].update(latent_dim=-3), "latent_dim must be > 0, got -3"),
        (lambda p: p["data"]["images"].update(dataset="imagenet"), "data.images.dataset"),
        (lambda p: p["data"]["images"].update(dataset="idx"), "needs data.images.root"),
        (lambda p: p.update(families={}), "name at least one family"),
        (lambda p: p["features"].update(inception_sha256="abc"), "features.inception_sha256: String should match"),
        (lambda p: p["evaluate"].update(k_nearest=300, curve_samples=250), "k_nearest (300) must be smaller"),
        (lambda p: p.update(seeds=[1, 1]), "training seeds must differ, got [1, 1]"),
        (lambda p: p.update(seeds=[]), "seeds: List should have at least 1 item"),
        (lambda p: p["families"]["transformer_lm"]["model"].update(d_model=30), "divisible by num_heads"),
        (lambda p: p["families"]["vae"]["train"].update(log_every=100, eval_every=50),
         "eval_every (50) must be a multiple of log_every (100)"),
        (lambda p: p["families"]["ddpm"]["train"].update(lr_schedule="exponential"),
         "families.ddpm.train.lr_schedule: Input should be 'constant', 'cosine' or 'linear'"),
        (lambda p: p["families"]["ddpm"]["train"].update(warmup_steps=10**6),
         f"warmup_steps (1000000) must be below steps"),
        (lambda p: p["families"]["dcgan"]["train"].update(ema_decay=1.0),
         "families.dcgan.train.ema_decay: Input should be less than 1 (got 1.0)"),
    ],
)
def test_bad_params_name_the_key_and_value(raw_params, change, expected):
    params = copy.deepcopy(raw_params)
    change(params)
    with pytest.raises(ParamsError) as error:
        parse_params(params)
    assert expected in str(error.value)


def test_missing_and_unparsable_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="nothere.yaml: file not found"):
        load_params(tmp_path / "nothere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match="broken.yaml: not valid YAML"):
        load_params(broken)


def test_cli_rejects_bad_params_before_any_work(raw_params, tmp_path):
    """The step entry point exits 2 with the key in the message and writes nothing."""
    params = copy.deepcopy(raw_params)
    params["families"]["vae"]["train"]["learning_rate"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "vae"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert result.returncode == 2
    assert "families.vae.train.learning_rate" in result.stderr and "-1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
