"""Save/load exactly the trainable weights (safetensors + resolved config JSON); nothing unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from cc_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, load_trainable, read_checkpoint, save_trainable


def test_roundtrip_exact_keys_and_values(tmp_path, make_model, make_batch, monkeypatch):
    model = make_model()
    with torch.no_grad():
        for p in model.trainable_named_parameters().values():
            p.add_(0.01 * torch.randn_like(p))  # differ from any fresh init
    save_trainable(model, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(saved) == set(model.trainable_named_parameters())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["model"]["mfi"]["dim"] == 32 and config["model"]["mfi"]["image_layers"] == [1, 2, 3]  # resolved
    assert config["cross_attention_layers"] == model.layer_names

    def no_unpickling(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    other = make_model(seed=0)
    load_trainable(other, tmp_path)
    for name, value in model.trainable_state_dict().items():
        torch.testing.assert_close(other.trainable_state_dict()[name], value, rtol=0, atol=0)
    batch = make_batch(model)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(batch)["total"], model(batch)["total"])
    rebuilt = load_model(tmp_path)  # tiny backbones rebuilt from the saved config
    assert rebuilt.params == model.params


def test_mismatched_config_or_keys_rejected(tmp_path, make_model, make_params):
    save_trainable(make_model(), tmp_path)
    with pytest.raises(ValueError, match="config differs"):
        load_trainable(make_model(make_params("id0_visual")), tmp_path)
    params, config, tensors = read_checkpoint(tmp_path)
    from safetensors.torch import save_file

    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"config": json.dumps(config, indent=2, sort_keys=True)})
    with pytest.raises(ValueError, match="missing keys"):
        load_trainable(make_model(), tmp_path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        read_checkpoint(tmp_path)


def rewrite_weights(directory, tensors) -> None:
    """Replace the checkpoint's tensors, keeping its metadata (the config copy) as save_trainable wrote it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def perturbed(model):
    with torch.no_grad():
        for p in model.trainable_named_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_wrong_shape_is_refused_before_anything_is_copied(tmp_path, make_model):
    save_trainable(perturbed(make_model()), tmp_path)
    _, _, tensors = read_checkpoint(tmp_path)
    target = make_model()
    wrong = list(target.trainable_named_parameters())[-1]  # the last copied: every other one would be overwritten
    tensors[wrong] = torch.zeros(*tensors[wrong].shape, 2)
    rewrite_weights(tmp_path, tensors)
    before = {k: v.clone() for k, v in target.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=rf"{wrong}.*shape"):
        load_trainable(target, tmp_path)
    for name, value in target.trainable_state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_weights_and_config_from_different_saves_are_refused(tmp_path, make_model, make_params):
    """A writer killed between the two atomic writes leaves new weights beside the old config."""
    import shutil

    save_trainable(make_model(), tmp_path / "old")
    save_trainable(make_model(make_params("id0_visual")), tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "old" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*{CONFIG_NAME}.*differ"):
        read_checkpoint(tmp_path / "old")
    with pytest.raises(ValueError, match="differ"):
        load_model(tmp_path / "old")
    _, _, tensors = read_checkpoint(tmp_path / "new")
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "new" / WEIGHTS_NAME))  # no metadata: not written by save_trainable
    with pytest.raises(ValueError, match="no config in its metadata"):
        read_checkpoint(tmp_path / "new")


def test_backbone_paths_are_machine_local_and_not_compared(tmp_path, make_model, make_params):
    import dataclasses

    def with_backbone(**changes):
        params = make_params()
        return dataclasses.replace(params, backbone=dataclasses.replace(params.backbone, **changes))

    here = {"sd15_path": "/a/sd15", "image_encoder_path": "/a/ip", "image_encoder_subfolder": "models/image_encoder"}
    there = {"sd15_path": "elsewhere/sd15", "image_encoder_path": "/b/ip-adapter", "image_encoder_subfolder": "encoder"}
    saved = perturbed(make_model(with_backbone(**here)))
    save_trainable(saved, tmp_path)
    target = make_model(with_backbone(**there))
    load_trainable(target, tmp_path)
    for name, value in saved.trainable_state_dict().items():
        torch.testing.assert_close(target.trainable_state_dict()[name], value, rtol=0, atol=0)
    assert target.params.backbone.sd15_path == "elsewhere/sd15"  # the model keeps its own paths
    for changes in ({"profile": "sd15"}, {"tiny_seed": 1}):  # which weights, not where: still compared
        with pytest.raises(ValueError, match="config differs"):
            load_trainable(make_model(with_backbone(**here, **changes)), tmp_path)


def test_load_model_refuses_backbones_of_other_random_weights(tmp_path, make_model):
    from cc_model.backbones import build_random_backbones, tiny_configs

    save_trainable(make_model(), tmp_path)  # tiny, seed 0
    load_model(tmp_path, backbones=build_random_backbones(tiny_configs(), seed=0))
    with pytest.raises(ValueError, match="trained on tiny seed 0 backbones, given tiny seed 1"):
        load_model(tmp_path, backbones=build_random_backbones(tiny_configs(), seed=1))


def test_an_extra_tensor_is_refused(tmp_path, make_model):
    save_trainable(make_model(), tmp_path)
    _, _, tensors = read_checkpoint(tmp_path)
    rewrite_weights(tmp_path, {**tensors, "extra.weight": torch.zeros(3)})  # same metadata, one tensor more
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra\.weight'\]"):
        load_trainable(make_model(), tmp_path)


def test_a_different_cross_attention_layer_order_is_refused(tmp_path, make_model):
    from safetensors.torch import save_file

    model = make_model()
    save_trainable(model, tmp_path)
    _, config, tensors = read_checkpoint(tmp_path)
    assert len(config["cross_attention_layers"]) > 1
    config["cross_attention_layers"] = config["cross_attention_layers"][::-1]  # both copies agree: only the order is off
    text = json.dumps(config, indent=2, sort_keys=True)
    (tmp_path / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"config": text})
    assert read_checkpoint(tmp_path)[1]["cross_attention_layers"] == model.layer_names[::-1]
    with pytest.raises(ValueError, match="cross-attention layers differ from the model's UNet"):
        load_trainable(make_model(), tmp_path)


def test_checkpoint_files_get_the_umasks_mode(tmp_path, make_model):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_trainable(make_model(), tmp_path)
    finally:
        os.umask(old)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # safetensors alone would leave the weights 0600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
