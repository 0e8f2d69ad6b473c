"""Fixtures of the embed tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip():
    from flows.embed.clip_model import ClipSpec, TINY_MODEL, load_clip

    return load_clip(ClipSpec(TINY_MODEL, None), device="cpu")
