"""Save and load exactly the trainable weights: safetensors plus the resolved config as JSON beside them.

Loading reads tensors with safetensors and the config with json + the strict typed loader, so
nothing is ever unpickled. The weights file's metadata carries the same config and must match the
JSON (the two files are replaced one after the other). The key set must match the model's trainable set exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cc_model.config import ModelParams
from flows.config.typed import from_mapping, to_mapping
from flows.errors import UserFacingError

WEIGHTS_NAME = "cc_adapter.safetensors"
CONFIG_NAME = "cc_adapter_config.json"
FORMAT_VERSION = 1


class CheckpointNotFoundError(UserFacingError, FileNotFoundError):
    """A checkpoint folder without the files save_trainable writes."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file 0600; others should read a checkpoint
    os.replace(tmp, path)  # a killed writer never leaves a truncated file under the real name


def save_trainable(model, directory: str | Path) -> Path:
    """Write WEIGHTS_NAME and CONFIG_NAME into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.trainable_state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "model": to_mapping(model.params),
        "profile": model.profile,
        "cross_attention_layers": list(model.layer_names),  # layer a -> processor name
    }
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"config": text}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return directory / WEIGHTS_NAME


def read_checkpoint(directory: str | Path) -> tuple[ModelParams, dict, dict[str, torch.Tensor]]:
    """(resolved ModelParams, the whole config mapping, tensors) from a checkpoint folder."""
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise CheckpointNotFoundError(f"{directory / name}: missing (not a cc_model checkpoint folder; the train "
                                          f"stage writes one: dvc repro train)")
    config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME}: format_version {config.get('format_version')!r} unsupported")
    # The two files are written one after the other; a writer killed between them leaves new weights
    # beside the old config. The weights carry their own copy of the config, which must agree.
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        embedded = (f.metadata() or {}).get("config")
    if embedded is None:
        raise ValueError(f"{directory / WEIGHTS_NAME}: no config in its metadata (not written by save_trainable)")
    if json.loads(embedded) != config:
        raise ValueError(
            f"{directory}: the config inside {WEIGHTS_NAME} and {CONFIG_NAME} differ (the two files come from "
            "different saves, e.g. a save killed between its two writes); refusing to pair them"
        )
    params = from_mapping(ModelParams, config["model"], "model")
    return params, config, load_file(str(directory / WEIGHTS_NAME))


# Where the backbones sit on this machine, not which backbones: left out of the compatibility check so
# a checkpoint loads where the same weights live elsewhere (the profile and tiny_seed stay compared).
BACKBONE_PATH_FIELDS = ("sd15_path", "image_encoder_path", "image_encoder_subfolder")


def comparable(params: ModelParams) -> ModelParams:
    """``params`` with the machine-local backbone path fields blanked, for the compatibility check."""
    backbone = dataclasses.replace(params.backbone, **{name: "" for name in BACKBONE_PATH_FIELDS})
    return dataclasses.replace(params, backbone=backbone)


def load_trainable(model, directory: str | Path) -> None:
    """Load a checkpoint into ``model``; config (less the backbone paths), keys, shapes and layer order must match."""
    params, config, tensors = read_checkpoint(directory)
    saved, own_params = comparable(params), comparable(model.params)
    if saved != own_params:
        raise ValueError(f"{directory}: checkpoint config differs from the model's:\n{saved}\n!=\n{own_params}")
    if config["cross_attention_layers"] != list(model.layer_names):
        raise ValueError(f"{directory}: cross-attention layers differ from the model's UNet")
    own = model.trainable_named_parameters()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{directory}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    # Every shape is checked before the first copy: a refused checkpoint leaves the model as it was.
    wrong = [
        f"{name} has shape {tuple(tensors[name].shape)}, model {tuple(param.shape)}"
        for name, param in own.items()
        if tensors[name].shape != param.shape
    ]
    if wrong:
        raise ValueError(f"{directory}: {len(wrong)} tensor(s) differ in shape from the model's: " + "; ".join(wrong[:5]))
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name])


def _check_backbones(directory: str | Path, params: ModelParams, backbones) -> None:
    """Refuse backbones of another kind than the checkpoint trained on: another profile, or other random weights.

    Real weights are found by path on each machine, so only their profile is compared (the shapes
    are checked when the weights load).
    """
    trained = params.backbone
    if backbones.profile != trained.profile or (trained.profile == "tiny" and backbones.seed != trained.tiny_seed):
        given = backbones.profile + (f" seed {backbones.seed}" if backbones.seed is not None else "")
        wanted = trained.profile + (f" seed {trained.tiny_seed}" if trained.profile == "tiny" else "")
        raise ValueError(f"{directory}: trained on {wanted} backbones, given {given} (model.backbone in params.yaml)")


def load_model(directory: str | Path, backbones=None):
    """A CustomContrastModel with the checkpoint's config and weights (backbones loaded if not given)."""
    from cc_model.backbones import load_backbones
    from cc_model.model import CustomContrastModel

    params, _, _ = read_checkpoint(directory)
    if backbones is not None:
        _check_backbones(directory, params, backbones)
    model = CustomContrastModel(backbones=backbones or load_backbones(params.backbone), params=params)
    load_trainable(model, directory)
    return model


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CheckpointNotFoundError", "load_model", "load_trainable", "read_checkpoint", "save_trainable"]
