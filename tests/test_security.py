"""Bad input and hostile files: a crafted checkpoint cannot run code, the report has no live
markup from untrusted text, and bad params or data stop the flow's entry point before any work.
"""

from __future__ import annotations

import copy
import hashlib
import html.parser
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.checkpoints import CheckpointError, checksum_path, load_model, load_torch
from tasks.report import build_report
from tests.conftest import REPO_ROOT
from tests.fake_run import make_fake_run


class _WritesMarker:
    """Unpickling this calls ``Path(marker).write_text("pwned")``: code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pwned")


def _with_valid_checksum(path: Path, data: bytes) -> Path:
    """The attacker also writes a matching checksum file, so only the unpickler stands in the way."""
    path.write_bytes(data)
    checksum_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_does_not_run(tmp_path, fmt):
    marker = tmp_path / "marker.txt"
    payload = {"family": "vae", "state_dict": {"w": torch.zeros(2)}, "x": _WritesMarker(marker)}
    if fmt == "torch.save":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    else:
        data = pickle.dumps(payload)
    path = _with_valid_checksum(tmp_path / "model.pt", data)
    for load in (load_torch, load_model):
        with pytest.raises(CheckpointError, match="cannot load checkpoint") as error:
            load(path)
        assert str(path) in str(error.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_WritesMarker(marker)))  # the payload is live: plain pickle does run it
    assert marker.read_text() == "pwned"


class _LiveMarkup(html.parser.HTMLParser):
    """Collects what a browser would execute: script elements, on* handlers, javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.found.append("<script>")
        for name, value in attrs:
            if name.lower().startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value!r}>")


def test_the_report_contains_no_live_markup_from_untrusted_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = build_report(make_fake_run()).read_text()
    parser = _LiveMarkup()
    parser.feed(page)
    assert parser.found == []
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # shown as text, not dropped


# --- bad params or data through the flow's entry point ---------------------------------------------
@pytest.fixture
def raw_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _write(folder: Path, params: dict | str) -> None:
    text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    (folder / "params.yaml").write_text(text)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda p, d: p["families"]["vae"]["train"].update(learning_rate=-1), "families.vae.train.learning_rate"),
    (lambda p, d: p["data"]["images"].update(dataset="imagenet"), "data.images.dataset"),
    (lambda p, d: p["families"].update(stylegan=p["families"]["vae"]), "unknown family 'stylegan'"),
    (lambda p, d: p["orchestration"].update(schedule="every night"), "orchestration.schedule"),
    (lambda p, d: p["data"]["text"].update(dataset="file", path=str(d / "empty.txt")), "empty.txt is empty"),
    (lambda p, d: p["data"]["images"].update(dataset="idx", root=str(d / "nowhere")), "nowhere"),
])
def test_the_flow_entry_point_stops_on_bad_params_or_data_before_any_work(tmp_path, raw_params, monkeypatch,
                                                                         capsys, change, expected):
    import flows.pipeline as entry

    params = copy.deepcopy(raw_params)
    (tmp_path / "empty.txt").write_text("")
    change(params, tmp_path)
    _write(tmp_path, params)
    monkeypatch.setattr(entry, "pipeline", None)  # the flow must not even be started
    assert entry.main(["--repo", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "params.yaml"]


def test_unparsable_params_stop_the_real_command_with_one_line(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _write(repo, "seed: [1,\n")
    result = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=repo, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "", "PREFECT_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and "params.yaml: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["params.yaml"]  # no lock, no stage output
