"""The model/train sections of params.yaml: strict typed loading, ablation presets, derived fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from cc_model.config import ABLATION_PRESETS, AblationParams, ModelParams, default_image_layers, resolve_model_params
from flows.config.params import Params, load_params
from flows.config.typed import ParamsError, from_mapping


def test_repo_params_yaml_has_model_and_train_sections():
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert params.model.ablation == ABLATION_PRESETS["id5_full"]
    assert params.train.loss.lambda1 == 1e-2 and params.train.loss.lambda2 == 1e-3
    assert params.model.placeholder_token == params.export.placeholder_token


def test_strict_loader_rejects_unknown_keys_and_bad_combinations():
    with pytest.raises(ParamsError, match="model.mfi.depht"):
        from_mapping(Params, {"model": {"mfi": {"depht": 4}}})
    with pytest.raises(ParamsError, match="model.ablation.cscl: requires model.ablation.textual_qformer"):
        from_mapping(Params, {"model": {"ablation": {"textual_qformer": False, "tv_fusion": False, "macl": False}}})
    with pytest.raises(ParamsError, match="train.loss.cscl_form"):
        from_mapping(Params, {"train": {"loss": {"cscl_form": "clip"}}})
    with pytest.raises(ParamsError, match="train.dropout"):
        from_mapping(Params, {"train": {"dropout": {"image": 0.6, "text": 0.6}}})
    with pytest.raises(ParamsError, match="train.hard_negatives_per_batch: must be below batch_size \\(4\\)"):
        from_mapping(Params, {"train": {"batch_size": 4, "hard_negatives_per_batch": 4}})


def test_presets_follow_tables_3_and_4():
    flags = {k: (v.textual_qformer, v.tv_fusion, v.cscl, v.macl) for k, v in ABLATION_PRESETS.items()}
    assert flags == {
        "id0_visual": (False, False, False, False),
        "id1_textual": (True, False, False, False),
        "id2_mfi": (True, True, False, False),
        "id3_cscl": (True, True, True, False),
        "id4_macl": (True, True, False, True),
        "id5_full": (True, True, True, True),
    }
    assert all(isinstance(v, AblationParams) and v.localisation for v in ABLATION_PRESETS.values())


def test_image_layers_evenly_spaced_ending_at_penultimate():
    assert default_image_layers(32, 3) == [10, 21, 31]  # ViT-H/14
    assert default_image_layers(24, 3) == [8, 15, 23]  # ViT-L/14
    assert default_image_layers(4, 3) == [1, 2, 3]  # tiny
    with pytest.raises(ParamsError):
        default_image_layers(3, 5)


def test_resolution_fills_derived_fields():
    resolved = resolve_model_params(ModelParams(), cross_attention_dim=768, image_num_hidden_layers=32)
    assert (resolved.mfi.dim, resolved.mfi.heads, resolved.mfi.image_layers) == (768, 12, [10, 21, 31])
