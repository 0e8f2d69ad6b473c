"""Backbones: offline tokenizer, tiny profile, and the real-weights loader on tiny models saved in the real layouts."""

from __future__ import annotations

import pytest
import torch

from cc_model.backbones import (
    CLIP_VOCAB_SIZE,
    BackboneNotFoundError,
    check_tokenizer,
    clip_tokenizer_from_open_clip,
    load_backbones,
    save_backbones,
)
from cc_model.config import BackboneParams


def test_tokenizer_is_clip_bpe_and_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tok = clip_tokenizer_from_open_clip()
    assert len(tok) == CLIP_VOCAB_SIZE
    reference = SimpleTokenizer()
    for text in ["a photo of sks dog", "Hello, World! it's 3 cats", "a sks in the snow-covered park"]:
        ours = tok(text, padding="max_length", max_length=20).input_ids
        theirs = reference(text, context_length=20)[0].tolist()
        n = theirs.index(49407) + 1
        assert ours[:n] == theirs[:n]
        assert set(ours[n:]) <= {49407}  # SD pads with <|endoftext|>, open_clip with 0
    assert tok("sks", add_special_tokens=False).input_ids == [48136]


def test_two_token_tokenizer_is_rejected():
    from transformers import CLIPTokenizer

    with pytest.raises(BackboneNotFoundError, match="expected 49408"):
        check_tokenizer(CLIPTokenizer(), "somewhere")


def test_tiny_profile_is_frozen(tiny_backbones):
    for module in (tiny_backbones.unet, tiny_backbones.vae, tiny_backbones.text_encoder, tiny_backbones.image_encoder):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training


def test_sd15_missing_names_path_and_command(tmp_path):
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "nope"))
    with pytest.raises(BackboneNotFoundError, match="hf download") as info:
        load_backbones(params)
    assert "nope" in str(info.value)
    repo = BackboneParams(profile="sd15")  # the default repo id is not in this machine's HF cache
    with pytest.raises(BackboneNotFoundError, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_backbones(repo)


def test_missing_weights_end_a_stage_in_one_error_line(tmp_path):
    """train and evaluate with sd15 weights not on disk: the `error:` line, not a traceback."""
    from flows.cli import run_stage

    (tmp_path / "params.yaml").write_text("{}\n")
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match=r"^error: .*nope.*hf download"):
        run_stage(lambda path: load_backbones(params), [str(tmp_path / "params.yaml")])


def test_sd15_incomplete_folder_names_missing_files(tmp_path, tiny_backbones):
    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "ip" / "models" / "image_encoder")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    with pytest.raises(BackboneNotFoundError, match="unet/diffusion_pytorch_model.safetensors"):
        load_backbones(params)


def test_real_loader_reads_tiny_models_saved_in_real_layouts(tmp_path, tiny_backbones):
    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "ip" / "models" / "image_encoder")
    assert (tmp_path / "sd" / "unet" / "config.json").is_file()
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    loaded = load_backbones(params)
    assert loaded.profile == "sd15" and len(loaded.tokenizer) == CLIP_VOCAB_SIZE
    ids = loaded.tokenizer(["a sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 32, 32)
    latents, t = torch.randn(1, 4, 16, 16), torch.tensor([3])
    ours, theirs = tiny_backbones, loaded
    with torch.no_grad():
        text = ours.text_encoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(theirs.text_encoder(input_ids=ids).last_hidden_state, text)
        torch.testing.assert_close(
            theirs.image_encoder(pixel_values=pixels).last_hidden_state,
            ours.image_encoder(pixel_values=pixels).last_hidden_state,
        )
        torch.testing.assert_close(
            theirs.unet(latents, t, encoder_hidden_states=text).sample,
            ours.unet(latents, t, encoder_hidden_states=text).sample,
        )
    assert theirs.scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_missing_image_encoder_names_the_subfolder_to_fetch(tmp_path, tiny_backbones):
    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "elsewhere")
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path="h94/IP-Adapter")
    with pytest.raises(BackboneNotFoundError, match=r"image_encoder_path.*--include 'models/image_encoder/\*'"):
        load_backbones(params)


def save_fp16_image_encoder_like_ip_adapter(backbones, image_encoder_dir, dtype_key: str) -> None:
    """The tiny image encoder saved as IP-Adapter's is: CLIPVisionModelWithProjection in fp16, config naming the dtype."""
    import json

    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(backbones.image_encoder.config)
    encoder.vision_model.load_state_dict(backbones.image_encoder.state_dict())
    encoder.to(torch.float16).save_pretrained(image_encoder_dir)
    path = image_encoder_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    config[dtype_key] = "float16"  # h94/IP-Adapter's config.json (older transformers) says "torch_dtype"
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("dtype_key", ["torch_dtype", "dtype"])
def test_fp16_saved_backbones_load_in_float32_and_train(tmp_path, tiny_backbones, make_params, make_batch, dtype_key):
    from cc_model.model import CustomContrastModel

    image_dir = tmp_path / "ip" / "models" / "image_encoder"
    save_backbones(tiny_backbones, tmp_path / "sd", image_dir)
    tiny_backbones.text_encoder.to(torch.float16).save_pretrained(tmp_path / "sd" / "text_encoder")
    tiny_backbones.unet.to(torch.float16).save_pretrained(tmp_path / "sd" / "unet")
    save_fp16_image_encoder_like_ip_adapter(tiny_backbones, image_dir, dtype_key)
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    loaded = load_backbones(params)
    model = CustomContrastModel(backbones=loaded, params=make_params()).eval()
    terms = model(make_batch(model))  # fp16 image encoder + fp32 rest: "mat1 and mat2 must have the same dtype"
    terms["total"].backward()
    assert torch.isfinite(terms["total"])
    for module in (loaded.unet, loaded.vae, loaded.text_encoder, loaded.image_encoder):
        assert module.dtype == torch.float32


def sd15_tokenizer_folder(backbones, folder) -> None:
    """The tokenizer as SD1.5 can ship it: vocab.json + merges.txt only, no tokenizer_config.json."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    backbones.tokenizer.backend_tokenizer.model.save(str(folder))  # writes exactly vocab.json + merges.txt
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]


def test_tokenizer_without_config_pads_to_the_text_encoders_length(tmp_path, tiny_backbones, make_params):
    from cc_model.model import CustomContrastModel

    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "ip" / "models" / "image_encoder")
    sd15_tokenizer_folder(tiny_backbones, tmp_path / "sd" / "tokenizer")
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    loaded = load_backbones(params)
    assert loaded.tokenizer.model_max_length == loaded.text_encoder.config.max_position_embeddings == 77
    model = CustomContrastModel(backbones=loaded, params=make_params())
    ids = model.tokenize(["a photo of sks dog"])
    assert ids.shape == (1, 77)
    assert ids.tolist() == tiny_backbones.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77).input_ids


def test_tokenizer_length_disagreeing_with_text_encoder_is_refused(tmp_path, tiny_backbones):
    import json

    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "ip" / "models" / "image_encoder")
    path = tmp_path / "sd" / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), model_max_length=64)))
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    with pytest.raises(ValueError, match=r"tokenizer.*model_max_length 64.*max_position_embeddings 77"):
        load_backbones(params)


def test_missing_local_folders_suggest_a_valid_download_command(tmp_path, tiny_backbones):
    from cc_model.config import IP_ADAPTER_REPO, SD15_REPO

    nope = tmp_path / "nope"
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbones(BackboneParams(profile="sd15", sd15_path=str(nope)))
    message = str(info.value)
    assert "model.backbone.sd15_path" in message
    assert f"hf download {SD15_REPO} --local-dir {nope}`" in message
    assert f"hf download {nope}" not in message  # not a repo id: not a valid command
    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "elsewhere")
    ip = tmp_path / "ip-nope"
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbones(BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(ip)))
    message = str(info.value)
    assert "model.backbone.image_encoder_path" in message
    assert f"hf download {IP_ADAPTER_REPO} --include 'models/image_encoder/*' --local-dir {ip}`" in message
    assert f"hf download {ip}" not in message


def test_incomplete_local_folders_suggest_a_valid_download_command(tmp_path, tiny_backbones):
    from cc_model.config import IP_ADAPTER_REPO, SD15_REPO

    save_backbones(tiny_backbones, tmp_path / "sd", tmp_path / "ip" / "models" / "image_encoder")
    (tmp_path / "ip" / "models" / "image_encoder" / "model.safetensors").unlink()
    params = BackboneParams(profile="sd15", sd15_path=str(tmp_path / "sd"), image_encoder_path=str(tmp_path / "ip"))
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbones(params)
    assert f"hf download {IP_ADAPTER_REPO} --include 'models/image_encoder/*' --local-dir {tmp_path / 'ip'}`" in str(
        info.value
    )
    (tmp_path / "sd" / "vae" / "config.json").unlink()
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbones(params)
    assert f"hf download {SD15_REPO} --local-dir {tmp_path / 'sd'}`" in str(info.value)


def test_path_that_is_not_a_valid_repo_id_gets_the_clear_error(tmp_path, monkeypatch):
    from cc_model.config import SD15_REPO

    monkeypatch.chdir(tmp_path)  # "my models/sd15" is relative and absent; with its space it is no valid repo id
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbones(BackboneParams(profile="sd15", sd15_path="my models/sd15"))
    message = str(info.value)
    assert "model.backbone.sd15_path" in message and "'my models/sd15'" in message
    assert f"hf download {SD15_REPO} --local-dir 'my models/sd15'`" in message
