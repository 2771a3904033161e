"""Checkpoints: the model's weights plus the resolved config that rebuilds it.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(..., weights_only=True)``: a crafted file cannot run code.

Every checkpoint ``X`` has a checksum file ``X.sha256`` beside it (``sha256sum`` format),
written in the same atomic step. The file is read once: the checksum is computed over the
bytes read and those same bytes are unpickled, so swapping the file in between changes nothing.

A model checkpoint's contents are validated before any model is built: its keys, a known
family, the family's config (strictly, with the same bounds as params.yaml), the data spec,
and the state dict's names and shapes against the model the config describes (built on the
``meta`` device, which allocates nothing). A model too large for the machine is refused
with its parameter count instead of an allocation of terabytes (``build_model``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from genai_models.base import GenerativeModel, ImageSpec, TextSpec, config_to_dict, spec_to_dict
from genai_models.registry import REGISTRY, get_family
from tasks.io import InputError, atomic_write_files, read_regular_file, remove_stale_temporaries, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_CHECKPOINT_BYTES = 64 * 2**30
MAX_PARAMETERS = 2**32  # beyond any family here; a typo in a size is refused before allocating
# Bytes per parameter to train: fp32 weights, gradients and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16
_SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKPOINT_KEYS = ("format_version", "family", "model_config", "data_spec", "state_dict")


def model_checkpoint(model: GenerativeModel, family: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict saved for a trained model: weights, family, resolved model config, data spec."""
    return {
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_config": config_to_dict(model.config),
        "data_spec": spec_to_dict(model.spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }


class CheckpointError(ValueError):
    """A checkpoint is corrupt, unverified or not loadable; the message names the file."""


def checksum_path(path: Path) -> Path:
    """Where the sha256 of checkpoint ``path`` is kept: ``<path>.sha256``."""
    return Path(path).with_name(Path(path).name + ".sha256")


def _checksum_line(digest: str, path: Path) -> bytes:
    return f"{digest}  {Path(path).name}\n".encode()


def _recorded_digest(checksum_file: Path) -> str:
    """The sha256 in a ``sha256sum`` line; ``CheckpointError`` naming the file when there is none."""
    try:
        line = read_regular_file(checksum_file, 4096).decode("ascii").strip()
    except InputError as err:
        raise CheckpointError(f"checksum file {err}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"checksum file {checksum_file} is not a sha256sum line (binary content)") from None
    digest = line.split(maxsplit=1)[0].lower() if line else ""
    if not _SHA256.fullmatch(digest):
        raise CheckpointError(f"checksum file {checksum_file} is not a sha256sum line "
                              f"({'empty' if not line else 'no 64-digit hex sha256 at its start'})")
    return digest


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, then write the file and its checksum atomically (temp, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_files([(path, data), (checksum_path(path), _checksum_line(hashlib.sha256(data).hexdigest(), path))])


def verify_checksum(path: Path, data: bytes | None = None) -> None:
    """Raise ``CheckpointError`` unless ``data`` (else the file's bytes) match the sha256 recorded beside ``path``."""
    path, recorded = Path(path), checksum_path(path)
    if not recorded.exists():
        raise CheckpointError(f"checkpoint {path} has no checksum file {recorded.name}; refusing to load it "
                              "unverified (it was not written by this pipeline, or its save was cut short)")
    expected = _recorded_digest(recorded)
    actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or was changed: its sha256 is {actual}, "
                              f"{recorded.name} says {expected}")


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Read the file once, verify those bytes' checksum, then torch.load them with ``weights_only=True``.

    Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = read_regular_file(path, MAX_CHECKPOINT_BYTES)
    except InputError as err:
        raise CheckpointError(f"checkpoint {err}") from None
    verify_checksum(path, data)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from None


def recover_interrupted_save(path: Path) -> None:
    """Finish or undo a ``save_torch`` of ``path`` whose process was killed; remove its temporaries.

    Killed before the renames: the previous file and checksum are intact, only temporaries
    are left. Killed between the two renames: the new file is in place and its checksum is
    still a complete temporary, which is renamed into place when it matches the file.
    """
    path, recorded = Path(path), checksum_path(path)
    pending = sorted(recorded.parent.glob(f".{recorded.name}.*.tmp")) if recorded.parent.is_dir() else []
    if pending and path.is_file():
        line = _checksum_line(sha256_file(path), path)
        if not (recorded.is_file() and recorded.read_bytes() == line):
            for candidate in pending:
                if candidate.read_bytes() == line:
                    os.replace(candidate, recorded)
                    log.warning("completed the interrupted save of %s (its checksum was not yet in place)", path)
                    break
    remove_stale_temporaries(path)
    remove_stale_temporaries(recorded)


class ModelTooLarge(ValueError):
    """The model a config describes has more parameters than the machine (or any sane run) can hold."""


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_model_size(family: str, config: Any, spec: ImageSpec | TextSpec, device: torch.device | str = "cpu",
                     training: bool = False) -> int:
    """Build the model on the ``meta`` device (nothing allocated) and refuse it when too large.

    Returns its parameter count. Raises ``ModelTooLarge`` when it has more than
    ``MAX_PARAMETERS`` parameters, or when its weights (with gradients and Adam state when
    ``training``) would not fit in the memory ``device`` has available now; ``ValueError``
    when the family refuses the config for this data (e.g. image sides it cannot handle).
    """
    device = torch.device(device)
    with torch.device("meta"):
        probe = get_family(family).build(config, spec)
    parameters = sum(p.numel() for p in probe.parameters())
    buffers = sum(b.numel() * b.element_size() for b in probe.buffers())
    needed = parameters * (TRAINING_BYTES_PER_PARAMETER if training else 4) + buffers
    available = _available_bytes(device)
    if parameters > MAX_PARAMETERS or needed > available:
        raise ModelTooLarge(f"the {family} model would have {parameters:,} parameters "
                            f"({needed / 2**30:,.1f} GiB {'to train' if training else 'of weights'}); "
                            f"{device.type} has {available / 2**30:,.1f} GiB available"
                            + (f" and the limit is {MAX_PARAMETERS:,} parameters" if parameters > MAX_PARAMETERS
                               else ""))
    return parameters


def validate_spec(data: Any) -> ImageSpec | TextSpec:
    """A data spec from a checkpoint's ``data_spec`` mapping; ``ValueError`` naming the bad field."""
    if not isinstance(data, dict) or data.get("kind") not in ("image", "text"):
        raise ValueError("data_spec must be a mapping with kind 'image' or 'text'")
    spec_class, limits = ((ImageSpec, {"channels": 64, "height": 4096, "width": 4096}) if data["kind"] == "image"
                          else (TextSpec, {"vocab_size": 10**7, "max_len": 65536, "pad_id": 10**7, "bos_id": 10**7,
                                           "eos_id": 10**7}))
    fields = {k: v for k, v in data.items() if k != "kind"}
    if set(fields) != set(limits):
        raise ValueError(f"data_spec must have exactly {', '.join(limits)}; got {', '.join(map(str, fields))}")
    for name, limit in limits.items():
        value, low = fields[name], 0 if name.endswith("_id") else 1
        if type(value) is not int or not low <= value <= limit:
            raise ValueError(f"data_spec.{name} must be an integer in {low}..{limit}, got {_short(value)}")
    spec = spec_class(**fields)
    if isinstance(spec, TextSpec) and max(spec.pad_id, spec.bos_id, spec.eos_id) >= spec.vocab_size:
        raise ValueError("data_spec: special token ids must be below vocab_size")
    return spec


def _short(value: Any) -> str:
    from tasks.config import short_repr

    return short_repr(value)


def _validated_contents(checkpoint: Any, path: Path) -> tuple[str, Any, ImageSpec | TextSpec, dict]:
    """(family, model config, data spec, state dict) of a loaded model checkpoint; ``CheckpointError`` if not."""
    from tasks.config import FamilyConfigError, validate_family_config

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is not a valid model checkpoint: {problem}")

    if not isinstance(checkpoint, dict):
        raise refuse(f"expected a mapping, got {type(checkpoint).__name__}")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise refuse(f"missing {', '.join(missing)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise refuse(f"format_version {_short(checkpoint['format_version'])}, this code reads {FORMAT_VERSION}")
    family = checkpoint["family"]
    if not isinstance(family, str) or family not in REGISTRY:
        raise refuse(f"unknown family {_short(family)}; known: {', '.join(REGISTRY)}")
    if not isinstance(checkpoint["model_config"], dict):
        raise refuse("model_config is not a mapping")
    try:
        config = validate_family_config(family, checkpoint["model_config"])
        spec = validate_spec(checkpoint["data_spec"])
    except FamilyConfigError as err:
        raise refuse(f"model_config: {err}") from None
    except ValueError as err:
        raise refuse(str(err)) from None
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise refuse("state_dict must be a non-empty mapping of names to tensors")
    return family, config, spec, state


def _check_state_matches(model: torch.nn.Module, state: dict, path: Path) -> None:
    """The state dict's names and shapes are exactly the model's (checked on the meta model)."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{name} {tuple(state[name].shape)} (expected {expected[name]})"
             for name in expected if name in state and tuple(state[name].shape) != expected[name]]
    problems = ([f"state_dict is missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing
                else []) + ([f"state_dict has unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + (
                [f"state_dict shape of {'; '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {'; '.join(problems)}")


def load_model(path: Path, device: torch.device | str = "cpu") -> GenerativeModel:
    """Rebuild a model from its checkpoint's own config (never from code defaults).

    The contents are validated, and the model's size and state dict checked on the meta
    device, before anything is allocated; every problem is a ``CheckpointError`` naming the file.
    """
    path = Path(path)
    family, config, spec, state = _validated_contents(load_torch(path), path)
    try:
        check_model_size(family, config, spec, device)
        with torch.device("meta"):
            _check_state_matches(get_family(family).build(config, spec), state, path)
    except ModelTooLarge as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    except CheckpointError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:  # the family refuses this config for this data
        raise CheckpointError(f"checkpoint {path} cannot be rebuilt: {err}") from None
    model = get_family(family).build(config, spec)
    model.load_state_dict(state)
    return model.to(device).eval()
