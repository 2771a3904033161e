"""``data.images.dataset: folder``: a folder of image files, labelled by class sub-folders or flat.

Every folder here is written into ``tmp_path`` by the test itself with Pillow (PNG, JPEG, WebP,
GIF), so the expected pixels, labels and checksums are known independently of the reader.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.config import ImageDataConfig, ParamsError, TextDataConfig, parse_params
from tasks.data import load_image_manifest, load_images, prepare, prepare_images
from tasks.datasets import DataError, check_sources, list_image_folder, read_image_folder
from tasks.io import sha256_file
from tests.pipeline_repo import tiny_params

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def solid(size: tuple[int, int], colour: tuple[int, int, int], jitter: int, seed: int) -> Image.Image:
    """An RGB image of one colour plus a little seeded noise (so images differ)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-jitter, jitter + 1, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """Two classes in four formats and several sizes; a nested folder; files that are not images."""
    root = tmp_path / "photos"
    for i in range(12):
        save(solid((24 + i, 20), RED, 10, i), root / "red" / f"r{i:02d}.png")
    for i in range(6):
        save(solid((20, 30), BLUE, 10, 100 + i), root / "blue" / f"b{i}.jpg", quality=95)
    for i in range(4):
        save(solid((40, 20), BLUE, 10, 200 + i), root / "blue" / "more" / f"w{i}.webp", lossless=True)
    save(solid((20, 20), BLUE, 0, 300).convert("P"), root / "blue" / "palette.gif")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save(solid((20, 20), GREEN, 0, 0), root / ".hidden" / "ignored.png")
    (root / "blue" / ".DS_Store").write_bytes(b"\0\1")
    return root


def folder_config(root: Path, **overrides) -> ImageDataConfig:
    return ImageDataConfig(dataset="folder", root=str(root), image_size=8, **overrides)


def test_labelled_folder_classes_labels_and_colours(labelled: Path, tmp_path: Path) -> None:
    manifest = prepare_images(folder_config(labelled), seed=0, out_dir=tmp_path / "out")
    assert manifest["classes"] == ["blue", "red"]  # sorted sub-folder names -> labels 0, 1
    assert manifest["image_shape"] == [3, 8, 8] and manifest["num_classes"] == 2
    assert sum(manifest["counts"].values()) == 23
    total = {label: sum(balance.get(label, 0) for balance in manifest["class_balance"].values()) for label in "01"}
    assert total == {"0": 11, "1": 12}
    for split in ("train", "val", "test"):
        images, labels = load_images(tmp_path / "out", split)
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 8, 8) and len(images)
        means = images.reshape(len(images), 3, -1).mean(-1)  # (N, 3): R, G, B in that order
        assert (means[labels == 1, 0] > 200).all() and (means[labels == 1, 2] < 40).all()  # red
        assert (means[labels == 0, 2] > 200).all() and (means[labels == 0, 0] < 40).all()  # blue
    source = manifest["source"]
    assert source["files"] == 23 and source["decoded"] == 23 and source["skipped_unreadable"]["count"] == 0
    assert source["ignored_not_images"]["files"] == ["red/notes.txt"]
    listing = list_image_folder(labelled)
    expected = hashlib.sha256("".join(
        f"{name}\t{hashlib.sha256((labelled / name).read_bytes()).hexdigest()}\n" for name in listing.files
    ).encode()).hexdigest()
    assert source["tree_sha256"] == expected
    assert "blue/more/w0.webp" in listing.files and not any("hidden" in f for f in listing.files)


def test_same_input_and_params_give_byte_identical_outputs(labelled: Path, tmp_path: Path) -> None:
    prepare_images(folder_config(labelled), seed=0, out_dir=tmp_path / "a")
    prepare_images(folder_config(labelled), seed=0, out_dir=tmp_path / "b")
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    prepare_images(folder_config(labelled), seed=1, out_dir=tmp_path / "c")
    assert file_hashes(tmp_path / "c")["val_labels.npy"] != file_hashes(tmp_path / "a")["val_labels.npy"] or \
        file_hashes(tmp_path / "c")["val_images.npy"] != file_hashes(tmp_path / "a")["val_images.npy"]
    # a changed file changes the tree checksum
    save(solid((24, 20), RED, 10, 999), labelled / "red" / "r00.png")
    changed = prepare_images(folder_config(labelled), seed=0, out_dir=tmp_path / "d")
    assert changed["source"]["tree_sha256"] != load_image_manifest(tmp_path / "a")["source"]["tree_sha256"]


def test_center_crop_then_resize_with_the_named_filter(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = BLUE, RED, GREEN  # the centred 10x10 square is red
    save(Image.fromarray(wide), root / "wide.png")
    tall = np.zeros((30, 10, 3), dtype=np.uint8)
    tall[:10], tall[10:20], tall[20:] = BLUE, GREEN, BLUE  # centred square: green
    save(Image.fromarray(tall), root / "tall.png")
    cfg = ImageDataConfig(dataset="folder", root=str(root), image_size=8, resize_filter="nearest")
    images = dict(zip(list_image_folder(root).files, read_image_folder(cfg).train_images))
    assert (images["wide.png"].transpose(1, 2, 0) == RED).all()
    assert (images["tall.png"].transpose(1, 2, 0) == GREEN).all()
    grey = read_image_folder(ImageDataConfig(dataset="folder", root=str(root), image_size=8, channels=1))
    assert grey.train_images.shape == (2, 1, 8, 8)
    grey_by_name = dict(zip(list_image_folder(root).files, grey.train_images))
    assert abs(grey_by_name["tall.png"].mean() - 0.587 * 255) <= 1  # ITU-R 601 luma of pure green
    assert abs(grey_by_name["wide.png"].mean() - 0.299 * 255) <= 1  # of pure red
    # the filter is applied: bicubic of a sharp edge differs from nearest
    checker = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((5, 5))).astype(np.uint8) * 255
    save(Image.fromarray(checker), root / "checker.png")
    nearest = read_image_folder(ImageDataConfig(dataset="folder", root=str(root), image_size=8, channels=1,
                                                resize_filter="nearest")).train_images[0]
    bicubic = read_image_folder(ImageDataConfig(dataset="folder", root=str(root), image_size=8, channels=1,
                                                resize_filter="bicubic")).train_images[0]
    assert set(np.unique(nearest)) <= {0, 255} and len(np.unique(bicubic)) > 2


def test_exif_orientation_transparency_and_16_bit_grey(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20], stored[:, 20:] = RED, BLUE  # shown rotated 90 degrees clockwise: red on top
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(stored), root / "a_rotated.jpg", exif=exif, quality=100)
    rgba = Image.new("RGBA", (10, 10), (255, 255, 255, 0))  # fully transparent white
    save(rgba, root / "b_transparent.png")
    save(Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)), root / "c_grey16.png")
    cfg = ImageDataConfig(dataset="folder", root=str(root), image_size=8, resize_filter="nearest")
    rotated, transparent, grey16 = read_image_folder(cfg).train_images
    assert rotated[0, :3].mean() > 200 and rotated[2, :3].mean() < 40   # top rows red
    assert rotated[2, -3:].mean() > 200 and rotated[0, -3:].mean() < 40  # bottom rows blue
    assert (transparent == 0).all()  # over black
    assert (grey16 == 255).all()     # 16-bit white is 8-bit white


def test_flat_folder_is_unlabeled_and_needs_inception(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(10):
        save(solid((12, 12), GREEN, 20, i), root / f"{i}.png")
    text = TextDataConfig()
    with pytest.raises(DataError, match="features.extractor") as info:
        check_sources(folder_config(root), text, extractor="classifier")
    assert "flat folder" in str(info.value) and str(root) in str(info.value)
    check_sources(folder_config(root), text, extractor="inception")
    manifest = prepare_images(folder_config(root), seed=0, out_dir=tmp_path / "out")
    assert manifest["classes"] is None and manifest["num_classes"] == 1
    assert manifest["source"]["labelled"] is False and sum(manifest["counts"].values()) == 10
    one_class = tmp_path / "one"
    save(solid((12, 12), GREEN, 20, 0), one_class / "only" / "x.png")
    with pytest.raises(DataError, match="single class sub-folder"):
        check_sources(folder_config(one_class), text, extractor="classifier")


def test_the_data_step_refuses_an_unlabeled_folder_without_inception_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(10):
        save(solid((12, 12), GREEN, 20, i), root / f"{i}.png")
    params = tiny_params(["vae"])
    params["data"]["images"] = {"dataset": "folder", "root": str(root), "image_size": 8}
    config = parse_params(params)
    with pytest.raises(DataError, match="features.extractor: classifier"):
        prepare("image", config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def broken_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a PNG file at all")
    return path


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    solid((30, 30), RED, 50, 7).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header intact, pixel data cut
    return path


@pytest.mark.parametrize("make_bad", [broken_png, truncated_png], ids=["not-an-image", "truncated"])
def test_an_undecodable_file_is_an_error_naming_it_and_nothing_is_written(labelled: Path, tmp_path: Path,
                                                                          make_bad) -> None:
    out = tmp_path / "out"
    prepare_images(folder_config(labelled), seed=0, out_dir=out)
    before = file_hashes(out)
    make_bad(labelled / "red" / "zz_bad.png")
    with pytest.raises(DataError, match="zz_bad.png") as info:
        prepare_images(folder_config(labelled), seed=0, out_dir=out)
    assert "skip_unreadable" in str(info.value)
    assert file_hashes(out) == before
    if make_bad is broken_png:  # the header is unreadable: the before-any-work check names it too
        with pytest.raises(DataError, match="zz_bad.png"):
            check_sources(folder_config(labelled), TextDataConfig())


def test_skip_unreadable_counts_and_lists_the_skipped_files(labelled: Path, tmp_path: Path) -> None:
    broken_png(labelled / "red" / "zz_bad.png")
    truncated_png(labelled / "blue" / "zz_cut.png")
    cfg = folder_config(labelled, skip_unreadable=True)
    check_sources(cfg, TextDataConfig())
    manifest = prepare_images(cfg, seed=0, out_dir=tmp_path / "out")
    assert manifest["source"]["skipped_unreadable"] == {"count": 2, "files": ["blue/zz_cut.png", "red/zz_bad.png"]}
    assert manifest["source"]["files"] == 25 and sum(manifest["counts"].values()) == 23


def test_an_image_smaller_than_image_size_is_an_error_before_any_work(labelled: Path, tmp_path: Path) -> None:
    save(solid((6, 40), RED, 0, 0), labelled / "red" / "thin.png")
    for check in (lambda: check_sources(folder_config(labelled), TextDataConfig()),
                  lambda: prepare_images(folder_config(labelled), seed=0, out_dir=tmp_path / "out")):
        with pytest.raises(DataError, match="thin.png") as info:
            check()
        assert "image_size 8" in str(info.value) and "6x40" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"a.png": "img", "cls/b.png": "img"}, "both at its top level"),
        ({"cls/b.png": "img", "empty/readme.txt": "txt"}, "hold no image files"),
        ({"notes.txt": "txt"}, "no image files"),
    ],
)
def test_folder_layout_errors(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "root"
    for name, kind in layout.items():
        if kind == "img":
            save(solid((10, 10), RED, 0, 0), root / name)
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("x")
    with pytest.raises(DataError, match=message):
        check_sources(folder_config(root), TextDataConfig(), extractor="inception")
    with pytest.raises(DataError, match="not a folder"):
        check_sources(folder_config(tmp_path / "missing"), TextDataConfig(), extractor="inception")


def test_folder_config_is_validated(tmp_path: Path) -> None:
    def images_error(images: dict) -> str:
        params = tiny_params(["vae", "realnvp"])
        params["data"]["images"] = images
        with pytest.raises(ParamsError) as info:
            parse_params(params)
        return str(info.value)

    assert "needs data.images.root" in images_error({"dataset": "folder", "image_size": 8})
    assert "needs data.images.image_size" in images_error({"dataset": "folder", "root": "x"})
    assert "divisible by 4" in images_error({"dataset": "folder", "root": "x", "image_size": 30})
    assert "only used with dataset 'folder'" in images_error({"dataset": "mnist-5k", "channels": 1})
    assert "channels" in images_error({"dataset": "folder", "root": "x", "image_size": 8, "channels": 2})
    assert "resize_filter" in images_error({"dataset": "folder", "root": "x", "image_size": 8,
                                            "resize_filter": "fancy"})
    # a family that cannot use the image size is named before any work (built on the meta device)
    params = tiny_params(["vae", "realnvp"])
    params["data"]["images"] = {"dataset": "folder", "root": "x", "image_size": 12}
    params["families"]["realnvp"]["model"]["num_scales"] = 4  # needs sides divisible by 8
    with pytest.raises(ParamsError, match=r"data.images.image_size: family realnvp .*divisible by 8"):
        parse_params(params)
    params["data"]["images"]["image_size"] = 16
    assert parse_params(params).data.images.image_size == 16


def test_grey_labelled_folder_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare -> features -> train -> evaluate -> report through the stage commands, on 1x8x8 images."""
    import json

    import yaml

    from flows.cli import run

    root = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for label, (low, high) in enumerate([(0, 60), (190, 255)]):  # dark and light patches: two classes
        for i in range(30):
            pixels = rng.integers(low, high, (12, 10), dtype=np.uint8)
            save(Image.fromarray(pixels, "L"), root / f"class_{label}" / f"{i:02d}.png")
    params = tiny_params(["vae", "dcgan"])
    params["data"]["images"] = {"dataset": "folder", "root": str(root), "image_size": 8, "channels": 1}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(repo)
    run(["prepare", "image"])
    assert load_image_manifest(Path("data/images"))["image_shape"] == [1, 8, 8]
    run(["features"])
    for family in ("vae", "dcgan"):
        run(["train", family])
        run(["evaluate", family])
        metrics = json.loads(Path(f"metrics/{family}.json").read_text())
        fid = metrics["fid"]  # value, its real-data floor and untrained ceiling (tasks/evaluate.py)
        assert np.isfinite(fid["value"]) and fid["floor"] < fid["ceiling"]
        if family == "vae":
            assert 0 < metrics["bits_per_dim_iwae"]["value"] <= metrics["bits_per_dim_elbo"]["value"] + 0.1
        assert Image.open(f"evaluation/{family}/samples.png").mode == "L"
    assert json.loads(Path("models/feature_extractor/summary.json").read_text())["test_accuracy"] > 0.9
    html = Path(run(["report"])).read_text()
    assert "vae" in html and "dcgan" in html


def test_an_unlabeled_folder_without_inception_stops_the_flow_and_the_features_step_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from flows.pipeline import main
    from tasks.features import build_feature_extractor

    root = tmp_path / "flat"
    for i in range(20):
        save(solid((12, 12), GREEN, 40, i), root / f"{i:02d}.png")
    params = tiny_params(["vae"])
    params["data"]["images"] = {"dataset": "folder", "root": str(root), "image_size": 8}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--repo", str(repo)]) == 2  # the flow's pre-check: no Prefect server, no stage
    assert "features.extractor" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == ["params.yaml"]
    # data prepared for inception, then the features step asked for the classifier: refused before training
    monkeypatch.chdir(repo)
    prepare_images(folder_config(root), seed=0, out_dir=Path("data/images"))
    with pytest.raises(DataError, match="features.extractor: classifier"):
        build_feature_extractor(parse_params(params))
    assert not Path("models").exists()
