"""Tiny random CustomContrast models, built fresh per test (installing processors mutates the UNet)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cc_model.backbones import build_random_backbones, tiny_configs
from cc_model.config import ABLATION_PRESETS, ModelParams, TrainParams

# Tests use smaller Q-formers than the defaults (depth 4, m 16) to stay fast on 2 shared CPU cores.
TEST_PARAMS = ModelParams(
    mfi=dataclasses.replace(ModelParams().mfi, num_visual_tokens=4, depth=2),
)


def params_for(preset: str = "id5_full", **overrides) -> ModelParams:
    return dataclasses.replace(TEST_PARAMS, ablation=ABLATION_PRESETS[preset], **overrides)


@pytest.fixture
def make_params():
    """params_for as a fixture: test ModelParams with an ablation preset and overrides."""
    return params_for


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_backbones():
    return build_random_backbones(tiny_configs(), seed=0, profile="tiny")


@pytest.fixture
def make_model():
    from cc_model.model import CustomContrastModel

    def make(params: ModelParams | None = None, train: TrainParams | None = None, seed: int = 0):
        backbones = build_random_backbones(tiny_configs(), seed=seed, profile="tiny")
        return CustomContrastModel(backbones=backbones, params=params or params_for(), train=train)

    return make


@pytest.fixture
def make_batch():
    from cc_model.synthetic import synthetic_batch

    def make(model, batch_size: int = 4, seed: int = 0):
        return synthetic_batch(model, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def exported(tables):
    """The tables fixture through pairs and export: one split, small shards (several row groups)."""
    from flows.config.params import ExportParams
    from pipeline_tables import export_tables

    export_tables(tables, ExportParams(image_side=64, rows_per_shard=7, heldout_fraction=0.0))
    return tables
