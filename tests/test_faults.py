"""Faults: killed training resumes exactly, killed checkpoint writes lose nothing, checksums catch
corruption, a full disk leaves previous outputs intact with a clear message.

The kills are real: a subprocess gets SIGKILL at a chosen moment.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from tasks import io as tasks_io
from tasks import paths
from tasks.checkpoints import CheckpointError, checksum_path, load_model, load_torch, save_torch
from tasks.config import parse_params
from tasks.data import prepare_images
from tasks.io import DiskFullError, atomic_write_bytes, atomic_write_json, replace_directory
from tasks.train import Trainer
from tests.conftest import REPO_ROOT
from tests.test_train import tiny_params


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GENAI_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended (exit {process.returncode}) before {path} appeared:\n"
                                 + process.stdout.read())
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(poll)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def stale(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


@pytest.fixture
def image_workspace(tmp_path, monkeypatch) -> Path:
    """cwd with prepared mnist-5k (256 training images) and a params.yaml for ``flows.cli``."""
    monkeypatch.chdir(tmp_path)
    params = tiny_params(steps=400, checkpoint_every=25)
    params["families"]["vae"]["train"]["log_every"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepare_images(parse_params(params).data.images, 0, paths.IMAGE_DATA)
    return tmp_path


# --- a killed training step -------------------------------------------------------------------
def test_training_killed_by_sigkill_resumes_to_the_same_weights(image_workspace):
    train = [sys.executable, "-m", "flows.cli", "train", "vae"]
    state = image_workspace / ".runs" / "vae" / "seed-0" / "state.pt"
    process = subprocess.Popen(train, cwd=image_workspace, env=child_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(state, process)
    kill(process)
    killed_at = load_torch(state)["step"]
    assert 0 < killed_at < 400 and not (image_workspace / "models" / "vae").exists()

    resumed = subprocess.run(train, cwd=image_workspace, env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"vae: resumed from step {killed_at}" in resumed.stderr
    resumed_weights = load_model(image_workspace / "models" / "vae" / "model.pt").state_dict()

    (image_workspace / "models" / "vae").rename(image_workspace / "resumed")
    straight = subprocess.run(train, cwd=image_workspace, env=child_env(), capture_output=True, text=True)
    assert straight.returncode == 0 and "resumed" not in straight.stderr, straight.stderr[-3000:]
    for name, value in load_model(image_workspace / "models" / "vae" / "model.pt").state_dict().items():
        assert torch.equal(value, resumed_weights[name]), f"{name} differs between resumed and uninterrupted runs"


# --- a kill during a checkpoint write ---------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from tasks.checkpoints import save_torch

    path, phase, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    save_torch({"step": torch.tensor(1)}, path)  # the last good checkpoint
    real_write, real_replace, renamed = os.write, os.replace, []

    def half_write_then_hang(fd, data):  # killed while the temporary file is half written
        real_write(fd, bytes(data[: len(data) // 2]))
        marker.touch()
        time.sleep(120)

    def hang_after_first_rename(src, dst):  # killed between the checkpoint's and its checksum's renames
        real_replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            marker.touch()
            time.sleep(120)

    if phase == "write":
        os.write = half_write_then_hang
    else:
        os.replace = hang_after_first_rename
    save_torch({"step": torch.tensor(2)}, path)
""")


@pytest.mark.parametrize(("phase", "step_after_restart"), [("write", 1), ("rename", 2)])
def test_a_kill_during_a_checkpoint_write_keeps_a_good_checkpoint(image_workspace, phase, step_after_restart):
    state = image_workspace / ".runs" / "vae" / "seed-0" / "state.pt"
    marker = image_workspace / "killed-here"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(state), phase, str(marker)],
                               cwd=image_workspace, env=child_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(marker, process, poll=0.01)
    kill(process)
    assert stale(state.parent), "the killed write should have left its temporary file"

    Trainer(parse_params(tiny_params()), "vae")  # the next start of training cleans up
    assert stale(state.parent) == []
    assert int(load_torch(state)["step"]) == step_after_restart  # verified against its checksum


def test_checkpoints_are_verified_against_their_checksum(tmp_path):
    path = tmp_path / "model.pt"
    save_torch({"weights": torch.arange(1000.0)}, path)
    assert checksum_path(path).read_text().split() == [tasks_io.sha256_file(path), "model.pt"]
    assert torch.equal(load_torch(path)["weights"], torch.arange(1000.0))

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt or was changed") as error:
        load_torch(path)
    assert str(path) in str(error.value)

    checksum_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"has no checksum file model\.pt\.sha256"):
        load_torch(path)


def test_a_corrupt_resume_state_is_reported_and_training_starts_over(image_workspace, caplog):
    config = parse_params(tiny_params(steps=6, checkpoint_every=3))
    trainer = Trainer(config, "vae")
    trainer.step = 3
    trainer.save_state()
    state = trainer.state_dir / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    fresh = Trainer(config, "vae")
    fresh.try_resume()
    assert fresh.step == 0
    assert f"checkpoint {state} is corrupt" in caplog.text


# --- a full disk -----------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"fid": 1.0})
    before = path.read_bytes()
    monkeypatch.setattr(os, "write", _disk_full)
    with pytest.raises(DiskFullError) as error:
        atomic_write_bytes(path, b"{}" * 1000)
    assert "disk full" in str(error.value) and str(path) in str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and stale(tmp_path) == []


def test_a_full_disk_keeps_the_previous_checkpoint_and_its_checksum(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_torch({"step": torch.tensor(1)}, path)
    monkeypatch.setattr(os, "write", _disk_full)
    with pytest.raises(DiskFullError, match="disk full"):
        save_torch({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_torch(path)["step"]) == 1 and stale(tmp_path) == []


@pytest.mark.parametrize("how", ["atomic write", "plain write"])
def test_a_full_disk_inside_replace_directory_keeps_the_previous_folder(tmp_path, monkeypatch, how):
    out = tmp_path / "models" / "vae"
    with replace_directory(out) as tmp:
        (tmp / "model.pt").write_bytes(b"good weights")
        (tmp / "summary.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DiskFullError) as error:
        with replace_directory(out) as tmp:
            (tmp / "loss.csv").write_text("step,loss\n")
            if how == "atomic write":
                monkeypatch.setattr(os, "write", _disk_full)
                atomic_write_bytes(tmp / "model.pt", b"new weights" * 1000)
            else:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.pt"))
    monkeypatch.undo()
    message = str(error.value)
    assert "disk full" in message and str(out) in message and "unchanged" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["vae"]  # no temporary folder left


def test_stale_temporaries_of_a_killed_replace_directory_are_cleaned_at_the_next_start(tmp_path):
    out = tmp_path / "models" / "vae"
    with replace_directory(out) as tmp:
        (tmp / "model.pt").write_bytes(b"v1")
    # What a writer killed between the swap's two renames leaves: the new folder still under
    # its temporary name, the old one moved aside, nothing at the final name.
    (tmp_path / "models" / ".vae.tmp-abcd1234").mkdir()
    out.rename(tmp_path / "models" / ".vae.old-efgh5678")
    (tmp_path / "models" / ".dcgan.tmp-ijkl9012").mkdir()  # another family's writer: not ours to touch
    with replace_directory(out) as tmp:
        assert (out / "model.pt").read_bytes() == b"v1"  # the previous output is back in place
        (tmp / "model.pt").write_bytes(b"v2")
    assert sorted(p.name for p in out.parent.iterdir()) == [".dcgan.tmp-ijkl9012", "vae"]
    assert (out / "model.pt").read_bytes() == b"v2"
