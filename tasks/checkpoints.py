"""Checkpoints: the model's weights plus the resolved config that rebuilds it.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(..., weights_only=True)``: a crafted file cannot run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from genai_models.base import GenerativeModel, config_to_dict, spec_from_dict, spec_to_dict
from genai_models.registry import get_family
from tasks.io import atomic_write_bytes

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


def save_torch(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a reader never sees half a file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from None


def load_model(path: Path, device: torch.device | str = "cpu") -> GenerativeModel:
    """Rebuild a model from its checkpoint's own config (never from code defaults)."""
    checkpoint = load_torch(path)
    family = get_family(checkpoint["family"])
    config = family.config_class(**checkpoint["model_config"])
    model = family.build(config, spec_from_dict(checkpoint["data_spec"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()
