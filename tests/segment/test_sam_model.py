"""SAM architectures and the one loader: a saved tiny model loads like an official checkpoint."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from flows.config.params import SegmentParams
from flows.segment.sam_model import (SPECS, SamCheckpointError, build_random_sam, load_sam, sam_for_params,
                                     save_sam)


def _outputs(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 255, (3, 200, 256), generator=gen).float()
    boxes = torch.tensor([[10.0, 20.0, 120.0, 150.0], [100.0, 30.0, 250.0, 190.0]])
    with torch.no_grad():
        out = model([{"image": image, "original_size": (200, 256), "boxes": boxes}], multimask_output=True)[0]
    return out["low_res_logits"], out["iou_predictions"]


def test_tiny_is_the_real_architecture_with_random_weights_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        sam = build_random_sam(SPECS["tiny"])
    assert sam.random_weights and "meaningless" in caplog.text
    assert type(sam.model).__module__ == "segment_anything.modeling.sam"
    assert sam.model.image_encoder.img_size == 256
    again = build_random_sam(SPECS["tiny"])  # a fixed seed: the same weights every time
    for a, b in zip(sam.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_saved_tiny_loads_through_the_checkpoint_loader(tmp_path):
    built = build_random_sam(SPECS["tiny"])
    save_sam(built.model, tmp_path / "sam_tiny.pth")
    loaded = load_sam(SPECS["tiny"], tmp_path / "sam_tiny.pth")
    assert not loaded.random_weights and loaded.model_id == "sam:tiny:sam_tiny.pth"
    for a, b in zip(_outputs(built.model), _outputs(loaded.model)):
        assert torch.equal(a, b)


def test_profile_sam_without_the_file_names_the_path_and_where_to_get_it(tmp_path):
    params = SegmentParams(sam_profile="sam", sam_model_type="vit_h", sam_checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(SamCheckpointError) as caught:
        sam_for_params(params)
    message = str(caught.value)
    assert str(tmp_path / "nope.pth") in message and "sam_vit_h_4b8939.pth" in message


def test_a_damaged_checkpoint_says_so_without_unsafe_advice(tmp_path):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(SamCheckpointError, match=r"cut\.pth is not a readable PyTorch state dict .*fetch https://") as err:
        load_sam(SPECS["tiny"], tmp_path / "cut.pth")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_the_stage_command_fails_in_one_line_before_any_flow_without_the_checkpoint(tmp_path, segment_data):
    from flows.cli import run_stage
    from flows.segment.flow import main

    params = tmp_path / "params.yaml"  # the fixture's frames include some without a provided mask: SAM must run
    params.write_text(f"filter:\n  out_dir: {segment_data.filtering.out_dir}\n"
                      f"segment:\n  sam_profile: sam\n  sam_checkpoint: {tmp_path / 'nope.pth'}\n")
    with pytest.raises(SystemExit) as exc:
        run_stage(main, [str(params)])
    assert str(exc.value).startswith(f"error: segment.sam_checkpoint: {tmp_path / 'nope.pth'} not found: download")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_sam(build_random_sam(SPECS["tiny"]).model, tmp_path / "sam_tiny.pth")
    deeper = dataclasses.replace(SPECS["tiny"], encoder_depth=3, encoder_global_attn_indexes=(2,))
    with pytest.raises(SamCheckpointError, match="not a SAM tiny state dict"):
        load_sam(deeper, tmp_path / "sam_tiny.pth")


@pytest.mark.parametrize("q_size, k_size, length", [(16, 16, 31), (8, 16, 31), (14, 14, 27), (4, 4, 9)])
def test_device_side_rel_pos_equals_segment_anythings(q_size, k_size, length):
    from flows.segment.sam_model import SAM_GET_REL_POS, get_rel_pos_on_device

    rel_pos = torch.randn(length, 6, generator=torch.Generator().manual_seed(q_size))
    assert torch.equal(get_rel_pos_on_device(q_size, k_size, rel_pos), SAM_GET_REL_POS(q_size, k_size, rel_pos))
