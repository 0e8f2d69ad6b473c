"""A reduced sample, generated once per test session for every test in this folder."""

from __future__ import annotations

import pytest

from flows import runtime

runtime.configure()  # EGL offscreen rendering before pyvista is imported

from flows.config.params import SampleParams  # noqa: E402
from flows.sample.generate import generate_sample  # noqa: E402

# every fault needs >= 5 objects (4 frame faults + the too-few-views object) and >= 5 views
SMALL = SampleParams(seed=7, n_objects=5, n_views=5, n_openimages_boxes=8, n_dreambench_subjects=2,
                     dreambench_images_per_subject=2)


@pytest.fixture(scope="session")
def small_params() -> SampleParams:
    return SMALL


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    return generate_sample(SMALL, tmp_path_factory.mktemp("sample") / "out")
