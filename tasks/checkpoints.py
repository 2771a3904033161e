"""Checkpoints: the model's weights plus the resolved config that rebuilds it.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(..., weights_only=True)``: a crafted file cannot run code.

Every checkpoint ``X`` has a checksum file ``X.sha256`` beside it (``sha256sum`` format),
written in the same atomic step and verified before ``X`` is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from genai_models.base import GenerativeModel, config_to_dict, spec_from_dict, spec_to_dict
from genai_models.registry import get_family
from tasks.io import atomic_write_files, remove_stale_temporaries, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
    return checksum_file.read_text().split(maxsplit=1)[0] if checksum_file.stat().st_size else ""


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, then write the file and its checksum atomically (temp, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_files([(path, data), (checksum_path(path), _checksum_line(hashlib.sha256(data).hexdigest(), path))])


def verify_checksum(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` matches the sha256 recorded beside it."""
    path, recorded = Path(path), checksum_path(path)
    if not recorded.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {recorded.name}; refusing to load it "
                              "unverified (it was not written by this pipeline, or its save was cut short)")
    expected, actual = _recorded_digest(recorded), sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or was changed: its sha256 is {actual}, "
                              f"{recorded.name} says {expected or '(empty)'}")


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Verify the checksum, then torch.load with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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


def load_model(path: Path, device: torch.device | str = "cpu") -> GenerativeModel:
    """Rebuild a model from its checkpoint's own config (never from code defaults)."""
    checkpoint = load_torch(path)
    family = get_family(checkpoint["family"])
    config = family.config_class(**checkpoint["model_config"])
    model = family.build(config, spec_from_dict(checkpoint["data_spec"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()
