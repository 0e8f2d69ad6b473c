"""Fixtures of the segment tests: the hand-made data set and the tiny random SAM."""

from __future__ import annotations

import pytest
from segment_fixtures import SegmentData, make_data

from flows.segment.sam_infer import SamRunner
from flows.segment.sam_model import SPECS, build_random_sam


@pytest.fixture
def segment_data(tmp_path) -> SegmentData:
    return make_data(tmp_path)


@pytest.fixture(scope="session")
def tiny_sam():
    return build_random_sam(SPECS["tiny"])


@pytest.fixture(scope="session")
def tiny_runner(tiny_sam) -> SamRunner:
    return SamRunner(tiny_sam, "cpu")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model is too small to gain from intra-op threads; on a shared 2-core machine
    they only contend (seen: 0.1 s with one thread, 3 s with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
