"""Downloads and archives: retries with backoff, fail-fast errors, all-or-nothing safe unpacking.

A local HTTP server on 127.0.0.1 (started here, in a thread) serves good, 404, flaky
(503 for the first requests), truncated and wrong-content files; archives are made by hand
in ``tmp_path``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks import download
from tasks.datasets import DataError, read_torchvision
from tasks.download import ArchiveError, DownloadError, download_file, extract_archive

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: Counter = Counter()
    flaky_failures = 2

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.hits[self.path] += 1
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/flaky/") and self.hits[self.path] <= self.flaky_failures:
            self.send_error(503, "busy, try later")
        elif self.path.startswith("/truncated/"):
            body = self.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes
            self.close_connection = True
        elif self.path.startswith("/wrong/"):
            self._send(bytes(reversed(self.files[name])))
        elif name in self.files and not self.path.startswith("/missing/"):
            self._send(self.files[name])
        else:
            self.send_error(404, "Not Found")

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """Base URL of a fresh local server; ``server.hits`` counts requests per path."""
    _Handler.files = {"payload.bin": PAYLOAD}
    _Handler.hits = Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield type("Server", (), {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "hits": _Handler.hits,
                                  "files": _Handler.files})
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(download, "_sleep", recorded.append)
    return recorded


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- download --------------------------------------------------------------------------------
def test_good_download_is_verified_and_reused_offline(server, sleeps, tmp_path):
    dest = tmp_path / "payload.bin"
    assert download_file(f"{server.url}/payload.bin", dest, md5=MD5) == dest
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == []
    download_file(f"{server.url}/payload.bin", dest, md5=MD5)  # already there and verified
    assert server.hits["/payload.bin"] == 1 and sleeps == []


def test_transient_errors_are_retried_with_exponential_backoff(server, sleeps, tmp_path):
    dest = download_file(f"{server.url}/flaky/payload.bin", tmp_path / "payload.bin", md5=MD5, backoff_s=0.5)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/flaky/payload.bin"] == 3
    assert sleeps == [0.5, 1.0]


def test_a_404_fails_at_once_naming_the_url(server, sleeps, tmp_path):
    url = f"{server.url}/missing/payload.bin"
    with pytest.raises(DownloadError, match="404") as error:
        download_file(url, tmp_path / "payload.bin", md5=MD5)
    assert url in str(error.value)
    assert server.hits["/missing/payload.bin"] == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_a_404_mirror_falls_through_to_the_next(server, sleeps, tmp_path):
    urls = [f"{server.url}/missing/payload.bin", f"{server.url}/payload.bin"]
    assert download_file(urls, tmp_path / "payload.bin", md5=MD5).read_bytes() == PAYLOAD
    assert sleeps == []


def test_a_checksum_mismatch_fails_at_once_naming_url_and_file(server, sleeps, tmp_path):
    url, dest = f"{server.url}/wrong/payload.bin", tmp_path / "payload.bin"
    with pytest.raises(DownloadError, match="checksum mismatch") as error:
        download_file(url, dest, md5=MD5)
    assert url in str(error.value) and str(dest) in str(error.value)
    assert server.hits["/wrong/payload.bin"] == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_a_body_cut_short_is_retried_then_reported_and_leaves_nothing(server, sleeps, tmp_path):
    url = f"{server.url}/truncated/payload.bin"
    with pytest.raises(DownloadError, match="gave up after 3 attempts") as error:
        download_file(url, tmp_path / "payload.bin", md5=MD5, attempts=3, backoff_s=0.1)
    assert url in str(error.value)
    assert server.hits["/truncated/payload.bin"] == 3 and sleeps == [0.1, 0.2]
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_host_is_retried(sleeps, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="gave up after 2 attempts"):
        download_file(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", attempts=2, backoff_s=0.25)
    assert sleeps == [0.25]


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_torchvision_path_downloads_verifies_and_unpacks_then_works_offline(server, sleeps, tmp_path, monkeypatch):
    """MNIST through torchvision with its URLs pointed at the local server (tiny fake IDX files)."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    resources = []
    for split, count in (("train", 12), ("t10k", 5)):
        images = _idx(rng.integers(0, 256, (count, 28, 28)), 0x0803)
        labels = _idx(rng.integers(0, 10, (count,)), 0x0801)
        for kind, raw in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte.gz"
            server.files[name] = gzip.compress(raw)
            resources.append((name, hashlib.md5(server.files[name]).hexdigest()))
    monkeypatch.setattr(tvd.MNIST, "resources", resources)
    monkeypatch.setattr(tvd.MNIST, "mirrors", [f"{server.url}/missing/", f"{server.url}/flaky/"])

    source = read_torchvision("mnist", tmp_path / "root", download=True)
    assert source.train_images.shape == (12, 1, 28, 28) and source.test_images.shape == (5, 1, 28, 28)
    raw = tmp_path / "root" / "MNIST" / "raw"
    assert {p.name for p in raw.iterdir()} == {n for n, _ in resources} | {n[:-3] for n, _ in resources}
    requests = sum(server.hits.values())
    read_torchvision("mnist", tmp_path / "root", download=True)  # everything is local now
    assert sum(server.hits.values()) == requests

    monkeypatch.setattr(tvd.MNIST, "mirrors", [f"{server.url}/wrong/"])
    with pytest.raises(DataError, match="checksum mismatch"):
        read_torchvision("mnist", tmp_path / "other", download=True)


# --- archives --------------------------------------------------------------------------------
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.fixture
def target(tmp_path) -> Path:
    """A target folder that already holds something, which a failed unpack must not touch."""
    folder = tmp_path / "target"
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "old.txt").write_text("old")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def test_tar_gz_is_unpacked(tmp_path, target):
    archive = _tar(tmp_path / "a.tar.gz", [_file("data/x.bin", PAYLOAD), _link("data/alias", "x.bin")])
    assert extract_archive(archive, target) == [target / "data"]
    assert (target / "data" / "x.bin").read_bytes() == PAYLOAD
    assert (target / "data" / "alias").resolve() == (target / "data" / "x.bin").resolve()
    assert (target / "keep" / "old.txt").read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".tar.gz", ".gz", ".zip"])
def test_a_truncated_archive_leaves_the_target_as_it_was(tmp_path, target, suffix):
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()  # incompressible: the cut hits data
    archive = tmp_path / f"a{suffix}"
    if suffix == ".tar.gz":
        _tar(archive, [_file("big.bin", blob), _file("second.bin", blob)])
    elif suffix == ".gz":
        archive.write_bytes(gzip.compress(blob))
    else:
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("big.bin", blob)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    before = snapshot(target)
    with pytest.raises(ArchiveError, match="truncated or corrupt") as error:
        extract_archive(archive, target)
    assert str(archive) in str(error.value)
    assert snapshot(target) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize(("member", "message"), [
    (_file("../evil.txt", b"x"), "outside the target folder"),
    (_file("ok/../../evil.txt", b"x"), "outside the target folder"),
    (_file("/tmp/evil.txt", b"x"), "absolute path"),
    (_link("link", "../../evil.txt"), "points outside"),
    (_link("link", "/etc/passwd"), "points outside"),
    (_link("deep/link", "../../evil.txt"), "points outside"),
    (_link("hard", "../evil.txt", tarfile.LNKTYPE), "outside the target folder"),
    ((lambda info: (setattr(info, "type", tarfile.CHRTYPE), (info, None))[1])(tarfile.TarInfo("dev")), "device"),
])
def test_hostile_tar_members_are_refused_and_nothing_is_written(tmp_path, target, member, message):
    archive = _tar(tmp_path / "evil.tar.gz", [_file("fine.txt", b"fine"), member])
    before = snapshot(target)
    with pytest.raises(ArchiveError, match=message):
        extract_archive(archive, target)
    assert snapshot(target) == before and leftovers(tmp_path) == []
    assert not (tmp_path / "evil.txt").exists()


def test_zip_is_unpacked_and_hostile_zip_members_are_refused(tmp_path, target):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zipped:
        zipped.writestr("d/x.bin", PAYLOAD)
    extract_archive(good, target)
    assert (target / "d" / "x.bin").read_bytes() == PAYLOAD
    before = snapshot(target)
    for name in ("../evil.txt", "/abs/evil.txt"):
        evil = tmp_path / "evil.zip"
        with zipfile.ZipFile(evil, "w") as zipped:
            zipped.writestr("fine.txt", b"fine")
            zipped.writestr(zipfile.ZipInfo(name), b"x")
        with pytest.raises(ArchiveError, match="refusing to unpack"):
            extract_archive(evil, target)
    assert snapshot(target) == before and not (tmp_path / "evil.txt").exists()


def test_single_file_gz_is_unpacked_beside_the_archive(tmp_path):
    archive = tmp_path / "raw" / "train-labels-idx1-ubyte.gz"
    archive.parent.mkdir()
    archive.write_bytes(gzip.compress(PAYLOAD))
    extract_archive(archive, archive.parent)
    assert (archive.parent / "train-labels-idx1-ubyte").read_bytes() == PAYLOAD
