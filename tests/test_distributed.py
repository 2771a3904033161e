"""Data-parallel training (DDP) on the CPU: two real processes under torchrun, gloo backend.

One torchrun launch trains vae, ddpm, pixelcnn and transformer_lm data-parallel twice: straight
through, and stopped after the step-3 checkpoint then resumed by a fresh Trainer. The test
compares the loss trajectory and weights with single-process training at the same global batch:

- pixelcnn and the LM (no dropout in their tiny configs) have deterministic objectives: the
  comparison is with the real single-process ``Trainer``;
- vae and ddpm draw noise inside the loss, and each process draws its own: the comparison is
  with a single-process loop that takes the same global batch as two halves with the same seeds
  and averages their gradients, i.e. single-process training given the same noise.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks import paths
from tasks.checkpoints import load_torch
from tasks.config import parse_params
from tasks.data import prepare_images, prepare_text
from tasks.distributed import DataParallel, launch_command
from tasks.train import Trainer, batch_indices
from tests.conftest import REPO_ROOT
from tests.test_train import tiny_params

FAMILIES = ("vae", "ddpm", "pixelcnn", "transformer_lm")
DETERMINISTIC = ("pixelcnn", "transformer_lm")
STEPS, BATCH, WORLD = 6, 16, 2

# Run by every torchrun process: straight DDP training (outputs), then stopped at step 3 and resumed.
# os.replace / os.rename (how every output and checkpoint lands, tasks/io.py) are watched per rank.
DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from torch import distributed as dist
from tasks import distributed, train
from tasks.config import load_params

dist.init_process_group("gloo")  # once for the script: train_family uses a group that is already there

writes = []
def watch(real):
    def wrapped(src, dst, *args, **kwargs):
        writes.append(str(dst))
        return real(src, dst, *args, **kwargs)
    return wrapped
os.replace, os.rename = watch(os.replace), watch(os.rename)

config = load_params("params.yaml")
for family in sys.argv[1].split(","):
    out = train.train_family(config, family)
    with distributed.process_group(torch.device("cpu")) as parallel:
        interrupted = train.Trainer(config, family, parallel=parallel)
        interrupted.fit(until=3)
        resumed = train.Trainer(config, family, parallel=parallel)
        resumed.try_resume()
        assert resumed.step == 3, resumed.step
        resumed.fit()
        if parallel.is_main:
            torch.save(resumed.model.state_dict(), f"resumed-{family}.pt")
    print(f"rank {os.environ['RANK']} {family}: train_family returned {out}", flush=True)
Path(f"writes-{os.environ['RANK']}.json").write_text(json.dumps(writes))
dist.destroy_process_group()
"""


def ddp_params() -> dict:
    params = tiny_params(steps=STEPS, checkpoint_every=3)
    for name in FAMILIES:
        params["families"][name]["train"].update(batch_size=BATCH, log_every=1, distributed=WORLD)
    return params


def single_process(params: dict) -> dict:
    params = copy.deepcopy(params)
    for block in params["families"].values():
        block["train"].pop("distributed", None)
    return params


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A workspace with tiny prepared data, after one two-process torchrun of ``DDP_SCRIPT``."""
    workspace = tmp_path_factory.mktemp("ddp")
    params = ddp_params()
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workspace / "ddp_script.py").write_text(DDP_SCRIPT)
    config = parse_params(params)
    prepare_images(config.data.images, config.seed, workspace / paths.IMAGE_DATA)
    prepare_text(config.data.text, config.seed, workspace / paths.TEXT_DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GENAI_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "ddp_script.py", ",".join(FAMILIES)]
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return workspace, params, result.stdout + result.stderr


def _ddp_curve(workspace: Path, family: str) -> list[dict]:
    lines = (workspace / "models" / family / "loss.csv").read_text().splitlines()
    header = lines[0].split(",")
    # empty cells: columns only some rows have (val_loss every eval_every steps)
    return [{k: float(v) for k, v in zip(header, line.split(",")) if v != ""} for line in lines[1:]]


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _shard_reference(params: dict, family: str, state_dir: Path) -> tuple[list[float], dict]:
    """Single-process training on the global batch given the processes' noise: each step, the two
    halves of the batch with the seed each process uses, gradients averaged, one optimizer step."""
    trainer = Trainer(parse_params(single_process(params)), family, state_dir=state_dir)
    model, (optimizer,) = trainer.model, trainer.optimizers
    seed, examples = trainer.seed, trainer.train_examples
    half = BATCH // WORLD
    losses = []
    model.train()
    for step in range(STEPS):
        batch = examples[batch_indices(step, examples.shape[0], BATCH, seed)]
        optimizer.zero_grad(set_to_none=True)
        mean = 0.0
        for rank in range(WORLD):
            torch.manual_seed(DataParallel(rank=rank, world_size=WORLD).step_seed(seed, step))
            loss = model.loss(batch[rank * half:(rank + 1) * half])["loss"] / WORLD
            loss.backward()
            mean += float(loss.detach())
        optimizer.step()
        if hasattr(model, "training_steps"):  # the VAE's own step count (its KL warm-up), as training_step keeps it
            model.training_steps += 1
        losses.append(mean)
    return losses, model.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_data_parallel_training_equals_single_process_training_at_the_same_global_batch(ddp_run, family, tmp_path,
                                                                                       monkeypatch):
    workspace, params, _ = ddp_run
    monkeypatch.chdir(workspace)
    ddp_curve = _ddp_curve(workspace, family)
    ddp_weights = load_torch(workspace / "models" / family / "model.pt")["state_dict"]
    assert [row["step"] for row in ddp_curve] == list(range(1, STEPS + 1))
    if family in DETERMINISTIC:
        single = Trainer(parse_params(single_process(params)), family, state_dir=tmp_path)
        single.fit()
        reference_losses, reference_weights = [row["loss"] for row in single.curve], single.model.state_dict()
    else:
        reference_losses, reference_weights = _shard_reference(params, family, tmp_path)
    differences = [_relative(row["loss"], ref) for row, ref in zip(ddp_curve, reference_losses)]
    weight_gap = max(float((ddp_weights[name] - value.cpu()).abs().max()) for name, value in reference_weights.items())
    print(f"{family}: max relative loss difference {max(differences):.2e}, max weight difference {weight_gap:.2e}")
    assert max(differences) <= 1e-5, f"{family}: relative loss differences per step {differences}"
    for name, value in reference_weights.items():
        torch.testing.assert_close(ddp_weights[name], value.cpu(), rtol=1e-4, atol=1e-5, msg=f"{family}: {name}")
    # the losses moved: a run that did not train would also "agree"
    assert ddp_curve[0]["loss"] != ddp_curve[-1]["loss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_data_parallel_training_resumes_to_the_same_weights(ddp_run, family):
    workspace, _, _ = ddp_run
    straight = load_torch(workspace / "models" / family / "model.pt")["state_dict"]
    resumed = torch.load(workspace / f"resumed-{family}.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{family}: {name} differs after a resumed DDP run"


def test_only_the_main_process_writes_outputs_and_checkpoints(ddp_run):
    workspace, _, output = ddp_run
    main, other = (json.loads((workspace / f"writes-{rank}.json").read_text()) for rank in (0, 1))
    assert other == [], f"rank 1 wrote {other}"
    for family in FAMILIES:
        assert any(path.endswith(f"models/{family}") for path in main), family
        assert any(path.endswith(f".runs/{family}/seed-0/state.pt") for path in main), family
        assert f"rank 1 {family}: train_family returned None" in output
        assert f"rank 0 {family}: train_family returned models/{family}" in output
    summary = json.loads((workspace / "models" / "vae" / "summary.json").read_text())
    assert summary["processes"] == WORLD


def test_the_cli_relaunches_itself_under_torchrun_with_the_same_arguments():
    command = launch_command(2, ["--params", "p.yaml", "train", "vae"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--standalone" in command
    assert command[-6:] == ["-m", "flows.cli", "--params", "p.yaml", "train", "vae"]


def test_families_that_cannot_train_data_parallel_are_refused_naming_the_key():
    from tasks.config import ParamsError

    params = tiny_params()
    params["families"]["dcgan"]["train"]["distributed"] = 2
    with pytest.raises(ParamsError, match=r"families\.dcgan\.train\.distributed: dcgan does not train data-parallel"):
        parse_params(params)
    params["families"]["dcgan"]["train"]["distributed"] = None
    params["families"]["vae"]["train"].update(distributed=3, batch_size=16)
    with pytest.raises(ParamsError, match=r"batch_size \(16\) must be divisible by distributed \(3 processes\)"):
        parse_params(params)


@pytest.mark.slow
def test_the_train_step_launches_torchrun_itself_when_distributed_is_set(tmp_path):
    """``python -m flows.cli train pixelcnn`` (the DVC stage's command) with ``distributed: 2``."""
    params = ddp_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = parse_params(params)
    prepare_images(config.data.images, config.seed, tmp_path / paths.IMAGE_DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GENAI_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "pixelcnn"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "data-parallel on 2 processes" in result.stderr
    assert json.loads((tmp_path / "models" / "pixelcnn" / "summary.json").read_text())["processes"] == 2
