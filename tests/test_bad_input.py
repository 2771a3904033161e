"""Regression tests for issue 16: bad input never reaches the user as a traceback.

Each section reproduces one numbered defect of the issue (the reproduction failed on main at
``ea9d1a2``); every one now ends in one clear error line (exit 2, naming the key, value or
file) or in correct behaviour. Hostile runs go through the real entry points in a child
process with a memory ceiling and a time limit (tests/bounded.py).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tasks import paths
from tasks.checkpoints import CheckpointError, checksum_path, load_model, load_torch, model_checkpoint, save_torch
from tasks.config import ParamsError, load_params, parse_params
from tasks.data import prepare_images
from tasks.datasets import DataError, read_idx
from tasks.io import replace_directory
from tests.bounded import GiB, assert_one_line_error, child_env, run_bounded
from tests.conftest import tiny_model
from tests.test_train import tiny_params


def write_params(folder: Path, params: dict | str | bytes) -> Path:
    path = folder / "params.yaml"
    if isinstance(params, dict):
        params = yaml.safe_dump(params, sort_keys=False)
    path.write_bytes(params if isinstance(params, bytes) else params.encode())
    return path


def set_key(params: dict, dotted: str, value) -> dict:
    params = copy.deepcopy(params)
    *parents, leaf = dotted.split(".")
    block = params
    for key in parents:
        block = block[key]
    block[leaf] = value
    return params


@pytest.fixture
def params() -> dict:
    return tiny_params()


# --- 1. a YAML alias bomb ------------------------------------------------------------------------
def alias_bomb(levels: int, width: int = 9) -> str:
    """The billion-laughs shape: level i is a list of ``width`` aliases of level i - 1."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def nested_alias_bomb(levels: int, width: int = 9) -> str:
    """The same bomb inside one value: ``[&a0 [lol, ...], &a1 [*a0, ...], ...]``."""
    items = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_a_yaml_alias_bomb_stops_check_at_once_with_a_short_message(tmp_path):
    """The issue's file (nine levels of nine aliases) through the real command: memory and time bounded."""
    write_params(tmp_path, alias_bomb(9))
    result = run_bounded(["flows.cli", "check"], tmp_path, timeout=60)
    line = assert_one_line_error(result, "params.yaml", "alias", max_length=400)
    assert result.seconds < 30 and result.peak_rss_bytes < GiB, (result.seconds, result.peak_rss_bytes)
    assert "lol, lol" not in line


def test_an_alias_bomb_inside_a_value_is_refused_too(tmp_path, params):
    params["report"]["title"] = "BOMB"
    text = yaml.safe_dump(params, sort_keys=False).replace("BOMB", nested_alias_bomb(12))
    started = time.perf_counter()
    with pytest.raises(ParamsError, match="alias") as error:
        load_params(write_params(tmp_path, text))
    assert time.perf_counter() - started < 5 and len(str(error.value)) < 400


# --- 2. missing bounds and coerced types -------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("seed", -1, "seed"),
    ("seed", 2**70, "seed"),
    ("families.vae.model.latent_dim", 10**12, "latent_dim"),
    ("families.vae.train.learning_rate", math.inf, "learning_rate"),
    ("families.transformer_lm.train.weight_decay", math.inf, "weight_decay"),
    ("families.vae.train.steps", 10**12, "steps"),
    ("families.vae.train.steps", 1e12, "steps"),
    ("families.vae.train.steps", "20", "steps"),
    ("mixed_precision", "yes", "mixed_precision"),
    ("data.text.min_tokens", 40, "min_tokens (40) must be <= max_tokens (32)"),
    ("evaluate.num_image_samples", 10**15, "num_image_samples"),
    ("families.pixelcnn.model.num_layers", 10**9, "num_layers"),
    ("families.ddpm.model.num_train_timesteps", 10**12, "num_train_timesteps"),
])
def test_values_out_of_range_or_of_the_wrong_type_are_refused_at_validation(params, key, value, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(set_key(params, key, value))
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_a_negative_seed_stops_the_prepare_stage_with_one_line(tmp_path, params, monkeypatch, capsys):
    """The issue: ``seed: -1`` passed validation and crashed ``prepare`` with a numpy ValueError."""
    from flows import cli

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, set_key(params, "seed", -1))
    assert cli.main(["prepare", "image"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "seed" in line and "-1" in line
    assert not (tmp_path / "data").exists()


def test_yaml_1_2_floats_are_floats_so_strict_types_keep_working(tmp_path, params):
    """``1e-3`` is a float (YAML 1.2); PyYAML alone reads it as the string '1e-3'."""
    text = yaml.safe_dump(params, sort_keys=False).replace("learning_rate: 0.001", "learning_rate: 1e-3", 1)
    assert "learning_rate: 1e-3" in text
    config = load_params(write_params(tmp_path, text))
    assert config.families["vae"].train.learning_rate == 0.001


# --- 3. the text reader trusts the file type --------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_prepare_text_refuses_a_fifo_and_a_device(tmp_path, params, kind):
    """The stage command itself (what dvc repro runs), not only the flow's pre-check: no hang, no endless read."""
    if kind == "fifo":
        path = tmp_path / "captions.fifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    params["data"]["text"].update(dataset="file", path=str(path))
    write_params(tmp_path, params)
    result = run_bounded(["flows.cli", "prepare", "text"], tmp_path, timeout=60)
    assert_one_line_error(result, str(path), "not a regular file")
    assert not (tmp_path / "data").exists()


def test_prepare_text_refuses_a_file_over_its_size_cap(tmp_path, params, monkeypatch, capsys):
    from flows import cli

    path = tmp_path / "big.txt"
    path.write_bytes(b"a short sentence here .\n" * (2 * 2**20 // 24 + 1))  # 2 MiB
    params["data"]["text"].update(dataset="file", path=str(path), max_file_mb=1)
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prepare", "text"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert str(path) in line and "larger than the cap of 1.0 MiB" in line and "data.text.max_file_mb" in line
    assert not (tmp_path / "data").exists()
    from tasks.datasets import read_sentence_file

    with pytest.raises(DataError, match="larger than"):  # the reader refuses it too, not only the check
        read_sentence_file(path, 2**20)


def test_a_huge_one_line_text_file_is_read_in_bounded_memory(tmp_path, params):
    """A 60 MB single line of two-letter words: old code tokenized it whole (20 M str objects, peak > 1.5 GB)."""
    path = tmp_path / "one-line.txt"
    path.write_bytes(b"ab " * (20 * 2**20) + b"\n")
    params["data"]["text"].update(dataset="file", path=str(path))
    write_params(tmp_path, params)
    result = run_bounded(["flows.cli", "prepare", "text"], tmp_path, timeout=120)
    assert_one_line_error(result, str(path), "no sentence of 3..32 tokens")
    assert result.peak_rss_bytes < GiB, result.peak_rss_bytes / GiB


# --- 4. report.path is not confined -------------------------------------------------------------
@pytest.mark.parametrize("value", ["params.yaml", "models", "reports/../params.yaml", "../report.html",
                                   "/tmp/report.html", "reports/metrics.csv", "reports/", "reports/report.txt"])
def test_report_path_must_be_an_html_file_under_reports(params, value):
    with pytest.raises(ParamsError) as error:
        parse_params(set_key(params, "report.path", value))
    assert "report.path" in str(error.value) and repr(value) in str(error.value)


def test_the_report_step_refuses_a_reports_folder_that_leads_outside_the_repository(tmp_path, monkeypatch):
    from tasks.io import OutputError
    from tasks.report import confined_report_path

    monkeypatch.chdir(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "reports").symlink_to(outside)
    with pytest.raises(OutputError, match="outside"):
        confined_report_path("reports/report.html")
    (tmp_path / "reports").unlink()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report.html").mkdir()  # a folder where the file goes
    with pytest.raises(OutputError, match="is a folder"):
        confined_report_path("reports/report.html")


# --- 5. raw tracebacks ----------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "expected"), [
    (b"seed: 0\nreport:\n  title: caf\xe9\n", "not UTF-8"),
    (b"seed: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested deeper than"),
    (b"seed: {" + b"a: {" * 50_000 + b"}" * 50_001 + b"\n", "nested deeper than"),
    (b"seed: 0\n# " + b"x" * (2 * 2**20) + b"\n", "larger than"),
])
def test_params_files_that_are_not_utf8_too_deep_or_too_large_are_named(tmp_path, content, expected):
    path = write_params(tmp_path, content)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(path) in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("sidecar", [b"\x00\xff\xfe binary\n", b"   \n\t\n", b"", b"nothex  model.pt\n"])
def test_a_binary_or_blank_checksum_file_is_a_checkpoint_error(tmp_path, sidecar):
    path = tmp_path / "model.pt"
    save_torch({"w": torch.zeros(3)}, path)
    checksum_path(path).write_bytes(sidecar)
    with pytest.raises(CheckpointError) as error:
        load_torch(path)
    assert str(checksum_path(path).name) in str(error.value)


def _forge(path: Path, checkpoint: dict) -> Path:
    """A weights-only checkpoint with a matching checksum: only validation stands in the way."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    path.write_bytes(data)
    checksum_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


def _drop(key):
    return lambda c: c.pop(key)


@pytest.mark.parametrize(("forge", "expected"), [
    (_drop("state_dict"), "missing"),
    (_drop("family"), "missing"),
    (_drop("model_config"), "missing"),
    (lambda c: c.update(family="stylegan"), "unknown family 'stylegan'"),
    (lambda c: c["model_config"].update(extra_key=1), "extra_key"),
    (lambda c: c.update(state_dict={}), "state_dict"),
    (lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))), "state_dict"),
    (lambda c: c["state_dict"].update({next(iter(c["state_dict"])): torch.zeros(1)}), "shape"),
    (lambda c: c["model_config"].update(latent_dim=10**9), "latent_dim"),
    (lambda c: (c["model_config"].update(hidden_dim=65536, base_channels=1024),
                c["data_spec"].update(height=4096, width=4096)), "parameters"),  # each value within its bound
    (lambda c: c["data_spec"].update(height=2**40), "data_spec"),
    (lambda c: c.update(format_version=99), "format_version"),
    (lambda c: c.update(state_dict=[1, 2]), "state_dict"),
])
def test_a_forged_weights_only_checkpoint_is_refused_before_the_model_is_built(tmp_path, forge, expected):
    checkpoint = model_checkpoint(tiny_model("vae"), "vae")
    forge(checkpoint)
    path = _forge(tmp_path / "model.pt", checkpoint)
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)
    assert time.perf_counter() - started < 10


def test_a_genuine_checkpoint_still_loads(tmp_path):
    model = tiny_model("vae")
    save_torch(model_checkpoint(model, "vae"), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def _idx(dims: list[int], payload: bytes = b"") -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def test_idx_files_with_no_training_images_are_a_data_error(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_idx([0, 28, 28]))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx([0]))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx([2, 28, 28], bytes(2 * 784)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx([2], bytes(2)))
    from tasks.config import ImageDataConfig

    with pytest.raises(DataError, match="no images") as error:
        prepare_images(ImageDataConfig(dataset="idx", root=str(root)), 0, tmp_path / "out")
    assert "train-images-idx3-ubyte" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_idx_header_dimensions_that_overflow_are_a_data_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx([2**31, 2**31, 4]))  # 2**64 bytes: an int64 product wraps to 0
    with pytest.raises(DataError, match="truncated") as error:
        read_idx(path, 0x0803)
    assert str(path) in str(error.value)


def test_a_gzip_idx_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    import tasks.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_IDX_BYTES", 2**20)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx([1024, 64, 64], bytes(1024 * 64 * 64)), mtime=0))
    with pytest.raises(DataError, match="larger than") as error:
        read_idx(path, 0x0803)
    assert str(path) in str(error.value)


# --- 6. concurrent writers ------------------------------------------------------------------------
def test_a_second_writer_of_the_same_folder_does_not_remove_the_first_ones_temporaries(tmp_path):
    from tasks.io import Busy

    out = tmp_path / "data" / "images"
    first = replace_directory(out)
    tmp = first.__enter__()
    (tmp / "train_images.npy").write_bytes(b"first")
    with pytest.raises(Busy) as error:
        with replace_directory(out):
            pytest.fail("two writers of one folder at once")
    assert str(out) in str(error.value) and f"pid {os.getpid()}" in str(error.value)
    assert tmp.is_dir()  # the live writer's temporary folder is still there
    first.__exit__(None, None, None)
    assert (out / "train_images.npy").read_bytes() == b"first"
    with replace_directory(out) as again:  # free again once the first writer is done
        (again / "train_images.npy").write_bytes(b"second")
    assert (out / "train_images.npy").read_bytes() == b"second"


@pytest.fixture
def image_workspace(tmp_path) -> Path:
    """A folder with params.yaml (vae: 400 steps, a checkpoint every 25) and prepared mnist-5k."""
    params = tiny_params(steps=400, checkpoint_every=25)
    params["families"]["vae"]["train"]["log_every"] = 100
    write_params(tmp_path, params)
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        prepare_images(parse_params(params).data.images, 0, paths.IMAGE_DATA)
    finally:
        os.chdir(previous)
    return tmp_path


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exit {process.returncode}: {process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_two_trainings_of_one_family_never_share_resumable_state(image_workspace):
    params = yaml.safe_load((image_workspace / "params.yaml").read_text())
    params["families"]["vae"]["train"]["steps"] = 200_000  # still training when the second one starts
    (image_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "vae"], cwd=image_workspace,
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(image_workspace / ".runs" / "vae" / "seed-0" / "state.pt", first)
        second = run_bounded(["flows.cli", "train", "vae"], image_workspace, timeout=60)
        line = assert_one_line_error(second, "vae", f"pid {first.pid}")
        assert "resumed" not in second.stderr
        assert "train" in line
    finally:
        first.kill()
        first.wait()


HOLD_THE_RUN_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flows.run_lock import run_lock

    with run_lock(Path(sys.argv[1]), "flow-run-of-the-child"):
        Path(sys.argv[2]).touch()
        time.sleep(300)
""")


@pytest.fixture
def flow_holding_the_lock(tmp_path):
    """Another process holding the checkout's run lock, the way a running flow does."""
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_LOCK, str(tmp_path), str(ready)], env=child_env())
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    ready.unlink()
    yield process
    process.kill()
    process.wait()


def test_a_stage_command_outside_the_running_flow_is_refused(tmp_path, params, flow_holding_the_lock, monkeypatch,
                                                            capsys):
    from flows import cli

    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prepare", "image"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "another pipeline run is working" in line and f"pid {flow_holding_the_lock.pid}" in line
    assert not (tmp_path / "data").exists()


def test_the_flows_own_stage_commands_run_inside_its_lock(tmp_path, monkeypatch):
    from flows.run_lock import FLOW_RUN_ENV, run_lock, stage_lock

    with run_lock(tmp_path, "run-1"):
        monkeypatch.setenv(FLOW_RUN_ENV, "run-1")
        with stage_lock(tmp_path, "python -m flows.cli train vae"):
            pass  # the flow's own stage: admitted
        monkeypatch.setenv(FLOW_RUN_ENV, "some-other-run")
        from flows.run_lock import PipelineBusy

        with pytest.raises(PipelineBusy):
            with stage_lock(tmp_path, "python -m flows.cli train vae"):
                pass


HOLD_A_STAGE_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flows.run_lock import stage_lock

    with stage_lock(Path(sys.argv[1]), "python -m flows.cli train vae"):
        Path(sys.argv[2]).touch()
        time.sleep(300)
""")


def test_a_flow_does_not_start_while_a_stage_command_runs(tmp_path):
    from flows.run_lock import PipelineBusy, run_lock, stage_lock

    ready = tmp_path / "ready"
    stage = subprocess.Popen([sys.executable, "-c", HOLD_A_STAGE_LOCK, str(tmp_path), str(ready)], env=child_env())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert stage.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with stage_lock(tmp_path, "python -m flows.cli train dcgan"):
            pass  # stage commands by hand may run side by side (each output has its own lock)
        with pytest.raises(PipelineBusy) as error:
            with run_lock(tmp_path, "flow-run"):
                pytest.fail("a flow must not start while a stage command runs")
        assert f"pid {stage.pid}" in str(error.value) and "flows.cli train vae" in str(error.value)
    finally:
        stage.kill()
        stage.wait()
    with run_lock(tmp_path, "flow-run"):  # the stage's lock went with its process
        pass


def test_dvc_repro_is_refused_while_a_flow_runs(tmp_path):
    from tests.pipeline_repo import clean_env, make_repo

    root = make_repo(tmp_path / "repo", ["vae"], stages=["prepare_image"])
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_LOCK, str(root), str(ready)], env=child_env())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        result = subprocess.run(["dvc", "repro"], cwd=root, env=clean_env(root), capture_output=True, text=True,
                                timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert "another pipeline run is working" in result.stdout + result.stderr
    assert not (root / "data" / "images").exists()


# --- 7. a killed flow leaks its temporary Prefect server --------------------------------------------
PARENT_WITH_A_SERVER = textwrap.dedent("""
    import subprocess, sys, time
    from flows.watchdog import POLL_SECONDS, stop_children_with_this_process

    stop_children_with_this_process()
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    grandchild = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    time.sleep(4 * POLL_SECONDS)  # the watchdog has seen them
    print(server.pid, grandchild.pid, flush=True)
    time.sleep(300)
""")


def test_a_helper_process_is_stopped_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT_WITH_A_SERVER], env=child_env(), stdout=subprocess.PIPE,
                              text=True)
    helpers = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
    helpers += helpers[1].children(recursive=True)  # the shell's own child: a grandchild of the parent
    assert len(helpers) == 3 and all(p.is_running() for p in helpers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=15)
    for process in alive:
        process.kill()
    assert not alive, f"outlived the process that started them: {alive}"


@pytest.mark.slow
def test_a_killed_flow_leaves_no_prefect_server_running(tmp_path):
    from tests.pipeline_repo import PYTHON, clean_env, make_repo

    root = make_repo(tmp_path / "repo", ["vae"])
    flow = subprocess.Popen([PYTHON, "-m", "flows.pipeline"], cwd=root, env=clean_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        servers: list[psutil.Process] = []
        while not servers:
            assert flow.poll() is None and time.monotonic() < deadline, "no temporary server seen"
            servers = [p for p in psutil.Process(flow.pid).children(recursive=True)
                       if "uvicorn" in " ".join(p.cmdline())]
            time.sleep(0.5)
        time.sleep(1)  # the watchdog notes the flow's descendants every 0.25 s
    finally:
        flow.send_signal(signal.SIGKILL)
        flow.wait()
    gone, alive = psutil.wait_procs(servers, timeout=20)
    for process in alive:
        process.kill()
    assert not alive, "uvicorn outlived the killed flow"


# --- 8. check-then-load race on checkpoints -----------------------------------------------------------
def test_a_checkpoint_is_hashed_and_loaded_from_the_same_bytes(tmp_path, monkeypatch):
    """The file is swapped for a forged one after it was verified, just before torch.load runs:
    what is loaded must be what was verified."""
    path = tmp_path / "model.pt"
    save_torch({"w": torch.ones(4)}, path)
    forged = io.BytesIO()
    torch.save({"w": torch.full((4,), 666.0)}, forged)
    real_load, swapped = torch.load, []

    def swap_then_load(*args, **kwargs):
        path.write_bytes(forged.getvalue())  # the attacker wins the race
        swapped.append(True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", swap_then_load)
    loaded = load_torch(path)
    assert swapped == [True]
    assert torch.equal(loaded["w"], torch.ones(4))  # the verified bytes, not the swapped file


# --- 9. a failed final write discards finished training ------------------------------------------
def test_unwritable_outputs_stop_training_before_the_first_step(tmp_path, monkeypatch):
    from tasks import train
    from tasks.data import prepare_text
    from tasks.io import OutputError

    monkeypatch.chdir(tmp_path)
    config = parse_params(tiny_params(steps=6))
    prepare_text(config.data.text, 0, paths.TEXT_DATA)
    (tmp_path / "models").write_text("not a folder")  # as root, a file is what no chmod can fake
    fitted = []
    monkeypatch.setattr(train.Trainer, "fit", lambda self: fitted.append(self.family))
    with pytest.raises(OutputError) as error:
        train.train_family(config, "transformer_lm")
    assert "models" in str(error.value) and fitted == []


def test_a_failed_final_write_keeps_the_finished_training_for_the_next_run(tmp_path, monkeypatch, caplog):
    from tasks import train
    from tasks.data import prepare_text
    from tasks.io import DiskFullError

    monkeypatch.chdir(tmp_path)
    config = parse_params(tiny_params(steps=6, checkpoint_every=4))
    prepare_text(config.data.text, 0, paths.TEXT_DATA)

    @contextlib.contextmanager
    def full_disk(final_dir):
        raise DiskFullError(28, f"disk full: no space left on device while writing {final_dir}")
        yield

    monkeypatch.setattr(train, "replace_directory", full_disk)
    with pytest.raises(DiskFullError):
        train.train_family(config, "transformer_lm")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert int(load_torch(tmp_path / ".runs" / "transformer_lm" / "seed-0" / "state.pt")["step"]) == 6
    caplog.set_level("INFO")
    train.train_family(config, "transformer_lm")
    assert "transformer_lm: resumed from step 6" in caplog.text
    assert (tmp_path / "models" / "transformer_lm" / "model.pt").is_file()


# --- 10. minor ---------------------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_lines(tmp_path):
    path = write_params(tmp_path, "seed: 0\nfamilies:\n  vae:\n    train: {steps: 5}\nseed: 7\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert "duplicate key 'seed'" in message and "line 1" in message and "line 5" in message


def test_a_refused_second_pipeline_run_starts_no_server_and_records_no_flow_run(tmp_path, params,
                                                                                  flow_holding_the_lock,
                                                                                  monkeypatch, capsys):
    import flows.pipeline as entry
    from prefect.server.api.server import SubprocessASGIServer

    write_params(tmp_path, params)
    monkeypatch.setattr(entry, "pipeline", None)  # the flow must not even be started
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: pytest.fail("server started"))
    assert entry.main(["--repo", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: another pipeline run is working") and "\n" not in line
    assert f"pid {flow_holding_the_lock.pid}" in line
