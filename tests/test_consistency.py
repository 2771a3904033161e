"""The family list lives in three places; they must agree. And the library stays pure."""

from __future__ import annotations

import subprocess
import sys

import yaml

from genai_models.registry import REGISTRY
from tests.conftest import REPO_ROOT


def _dvc() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def test_params_dvc_and_registry_name_the_same_families():
    params = set(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["families"])
    stages = _dvc()["stages"]
    trained = set(stages["train"]["foreach"])
    evaluated = set(stages["evaluate_image"]["foreach"]) | set(stages["evaluate_text"]["foreach"])
    reported = {dep.split("/")[1].removesuffix(".json") for dep in stages["report"]["deps"]
                if dep.startswith(("models/", "evaluation/", "metrics/"))} - {"feature_extractor"}  # not a family
    assert params == set(REGISTRY) == trained == evaluated == reported


def test_each_family_is_evaluated_by_the_stage_of_its_modality():
    stages = _dvc()["stages"]
    for name in stages["evaluate_image"]["foreach"]:
        assert REGISTRY[name].modality == "image", name
    for name in stages["evaluate_text"]["foreach"]:
        assert REGISTRY[name].modality == "text", name
    for name, item in stages["train"]["foreach"].items():
        assert item["data"] == ("data/images" if REGISTRY[name].modality == "image" else "data/text"), name


def test_every_family_has_its_own_module_as_a_dvc_dependency():
    for name in REGISTRY:
        assert (REPO_ROOT / "genai_models" / f"{name}.py").is_file(), name
    assert "genai_models/${key}.py" in _dvc()["stages"]["train"]["do"]["deps"]


def test_genai_models_imports_no_orchestration_or_reporting_package():
    code = ("import sys, genai_models.registry, genai_models.metrics, genai_models.text, "
            "genai_models.feature_extractor; "
            "bad = [m for m in ('prefect', 'dvc', 'pandas', 'jinja2', 'tasks', 'flows') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
