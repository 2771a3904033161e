"""Colour, end to end: a real RGB data set in class folders through the real Prefect flow.

The photographs scikit-learn ships (``load_sample_images``: a Chinese temple and a flower, both
427 x 640, no download) are cut into patches at fixed positions and written as PNG files into
two class folders, one per photograph. The whole pipeline (every family, the project's own
dvc.yaml, tiny params) then runs on them as ``data.images.dataset: folder`` at 16 x 16 x 3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genai_models.registry import REGISTRY
from tests.pipeline_repo import FAMILIES, clean_env, make_repo, run, tiny_pipeline_params

PATCH = 48          # pixels; patches are cut on a fixed grid, some of them not square (center-crop at work)
IMAGE_SIZE = 16


def write_sample_image_folder(root: Path) -> dict[str, int]:
    """PNG patches of the two sklearn photographs in ``root/<photo>/``; returns the count per class."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    counts = {}
    for name, photo in zip(photos.filenames, photos.images):  # (427, 640, 3) uint8 each
        label = Path(name).stem  # china, flower
        (root / label).mkdir(parents=True)
        count = 0
        for top in range(0, photo.shape[0] - PATCH, PATCH):
            for left in range(0, photo.shape[1] - PATCH, PATCH // 2):
                width = PATCH if (top // PATCH + left // (PATCH // 2)) % 3 else PATCH + 16  # every third is wider
                patch = photo[top:top + PATCH, left:left + width]
                Image.fromarray(np.ascontiguousarray(patch)).save(root / label / f"{top:03d}_{left:03d}.png")
                count += 1
        counts[label] = count
    return counts


@pytest.mark.slow
def test_rgb_folder_runs_through_the_whole_pipeline(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    counts = write_sample_image_folder(images)
    params = tiny_pipeline_params()
    params["data"]["images"] = {"dataset": "folder", "root": str(images), "image_size": IMAGE_SIZE, "channels": 3,
                                "max_train": 300}
    root = make_repo(tmp_path / "repo", FAMILIES, params)
    env = clean_env(root)
    env.pop("OMP_NUM_THREADS")
    flow = run([sys.executable, "-m", "flows.pipeline"], root, env, timeout=1800)
    assert f"report: {root / 'reports' / 'report.html'}" in flow.stdout

    manifest = json.loads((root / "data" / "images" / "manifest.json").read_text())
    assert manifest["classes"] == ["china", "flower"] and manifest["image_shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert manifest["source"]["files"] == sum(counts.values()) and manifest["source"]["labelled"] is True
    train = np.load(root / "data" / "images" / "train_images.npy")
    assert train.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert not np.array_equal(train[:, 0], train[:, 2])  # real colour: red and blue planes differ
    extractor = json.loads((root / "models" / "feature_extractor" / "summary.json").read_text())
    assert extractor["test_accuracy"] > 0.7  # temple vs flower patches are easy to tell apart
    image_families = [f for f in FAMILIES if REGISTRY[f].modality == "image"]
    for family in image_families:
        metrics = json.loads((root / "metrics" / f"{family}.json").read_text())
        fid = metrics["fid"]  # value, its real-data floor and untrained ceiling (tasks/evaluate.py)
        assert np.isfinite(fid["value"]) and fid["floor"] < fid["ceiling"], family
        samples = Image.open(root / "evaluation" / family / "samples.png")
        assert samples.mode == "RGB", family
        grid = np.asarray(samples)
        assert grid.shape[-1] == 3 and not np.array_equal(grid[..., 0], grid[..., 2]), family
    html = (root / "reports" / "report.html").read_text()
    assert all(family in html for family in image_families)
    assert "Running stage" not in run(["dvc", "repro"], root, env).stdout  # the flow recorded every stage
