import open_clip
import pytest
import torch

from flows.config.params import EmbedParams
from flows.embed.clip_model import (
    SD15_MODEL, SD15_PRETRAINED, TINY_MODEL, ClipSpec, MissingCheckpointError, check_weights, load_clip,
    save_checkpoint, spec_for,
)
from flows.embed.encode import encode_pixels


def _pixels(clip, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)


def test_tiny_profile_is_the_registered_random_config(tiny_clip):
    assert spec_for(EmbedParams(profile="tiny")) == ClipSpec(TINY_MODEL, None)
    assert tiny_clip.model_id == f"{TINY_MODEL}:random-seed0"
    assert tiny_clip.random_weights and tiny_clip.dim == 32 and tiny_clip.image_size == 64
    assert TINY_MODEL in open_clip.list_models()


def test_random_init_is_deterministic(tiny_clip):
    again = load_clip(ClipSpec(TINY_MODEL, None))
    for (name, a), (_, b) in zip(tiny_clip.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_checkpoint_round_trip_through_the_real_loader(tmp_path, tiny_clip):
    path = save_checkpoint(tiny_clip.model, tmp_path / "cc-tiny" / "open_clip_pytorch_model.bin")
    # open_clip's own entry point, exactly as for a downloaded checkpoint ...
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(path))
    model.eval()
    # ... and the stage's loader through the `named` profile.
    named = load_clip(spec_for(EmbedParams(profile="named", model=TINY_MODEL, pretrained=str(path))))
    assert not named.random_weights and named.model_id == f"{TINY_MODEL}:{path}"
    pixels = _pixels(tiny_clip)
    expected = encode_pixels(tiny_clip.model, pixels)
    assert torch.equal(encode_pixels(model, pixels), expected)
    assert torch.equal(encode_pixels(named.model, pixels), expected)
    assert str(preprocess) == str(tiny_clip.preprocess)


def test_embeddings_are_unit_float16(tiny_clip):
    emb = encode_pixels(tiny_clip.model, _pixels(tiny_clip, n=8))
    assert emb.dtype == torch.float16 and emb.shape == (8, 32)
    assert torch.allclose(emb.float().norm(dim=-1), torch.ones(8), atol=2e-3)


def test_sd15_missing_from_cache_names_the_file_and_the_fix(tmp_path):
    spec = spec_for(EmbedParams(profile="sd15"))
    assert spec == ClipSpec(SD15_MODEL, SD15_PRETRAINED)
    with pytest.raises(MissingCheckpointError) as err:
        check_weights(spec, cache_dir=str(tmp_path))
    text = str(err.value)
    assert "ViT-H-14:laion2b_s32b_b79k" in text
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_model.safetensors" in text
    assert "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in text
    assert "embed.profile: named with embed.model: ViT-H-14 and embed.pretrained: <local checkpoint file>" in text


def test_sd15_found_in_hub_cache(tmp_path):
    repo = tmp_path / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    found = check_weights(ClipSpec(SD15_MODEL, SD15_PRETRAINED), cache_dir=str(tmp_path))
    assert found.endswith("snapshots/abc/open_clip_pytorch_model.bin")


@pytest.mark.parametrize("model,pretrained,needle", [
    ("ViT-L-14", "models/absent/ViT-L-14.pt", "checkpoint file models/absent/ViT-L-14.pt"),
    ("ViT-L-14", "no_such_tag", "neither a file nor a pretrained tag of ViT-L-14"),
    ("ViT-Z-99", "whatever", "'ViT-Z-99' is not an open_clip architecture"),
])
def test_named_profile_errors(model, pretrained, needle):
    with pytest.raises(MissingCheckpointError, match="embed: ") as err:
        check_weights(spec_for(EmbedParams(profile="named", model=model, pretrained=pretrained)))
    assert needle in str(err.value)


def test_stage_entry_point_fails_in_one_line_without_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flows.cli import run_stage
    from flows.embed.flow import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    (tmp_path / "params.yaml").write_text("embed:\n  profile: sd15\n")
    with pytest.raises(SystemExit) as exc:
        run_stage(main, [str(tmp_path / "params.yaml")])
    assert str(exc.value).startswith("error: embed: weights of ViT-H-14:laion2b_s32b_b79k")
    assert "\n" not in str(exc.value)
