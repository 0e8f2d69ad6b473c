"""Batched SAM inference against segment-anything's own per-image code path (tiny random model)."""

from __future__ import annotations

import numpy as np
import torch

from flows.segment.sam_infer import ImagePrompts, decode_prompts, stability_scores


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _prompts(runner, seed, height, width, boxes):
    rgb = _image(seed, height, width)
    return ImagePrompts(resized=runner.resize(rgb), original_size=(height, width),
                        boxes=np.asarray(boxes, dtype=np.float64), mask_prompts=[None] * len(boxes))


def test_preprocess_is_sams_normalise_and_pad(tiny_runner):
    images = [tiny_runner.resize(_image(0, 90, 140)), tiny_runner.resize(_image(1, 150, 60))]
    batch = tiny_runner.preprocess(images)
    sam = tiny_runner.model
    for i, image in enumerate(images):
        reference = sam.preprocess(torch.as_tensor(image).permute(2, 0, 1).float())
        torch.testing.assert_close(batch[i], reference)


def test_one_decoder_call_for_all_boxes_equals_the_per_image_decoder(tiny_runner):
    sam = tiny_runner.model
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 32, 16, 16, generator=gen)
    boxes = torch.tensor([[10.0, 10.0, 100.0, 200.0], [50.0, 0.0, 250.0, 90.0], [0.0, 0.0, 256.0, 256.0]])
    index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        low, iou = decode_prompts(sam, embeddings, index, boxes, None, multimask=True)
        for image in (0, 1):
            sel = index == image
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[sel], masks=None)
            ref_low, ref_iou = sam.mask_decoder(embeddings[image:image + 1], sam.prompt_encoder.get_dense_pe(),
                                                sparse, dense, multimask_output=True)
            torch.testing.assert_close(low[sel], ref_low)
            torch.testing.assert_close(iou[sel], ref_iou)


def test_batched_masks_equal_sams_forward_with_the_best_of_three(tiny_runner):
    sam = tiny_runner.model
    specs = [(2, 90, 140, [[5, 5, 80, 70], [60, 20, 139, 89]]), (3, 150, 60, [[0, 10, 50, 140]])]
    images = [_prompts(tiny_runner, *spec) for spec in specs]
    answers = tiny_runner.segment(images)
    for (seed, height, width, boxes), image, answer in zip(specs, images, answers):
        record = {"image": torch.as_tensor(image.resized).permute(2, 0, 1).float(), "original_size": (height, width),
                  "boxes": torch.as_tensor(tiny_runner.transform.apply_boxes(image.boxes, (height, width))).float()}
        with torch.no_grad():
            out = sam([record], multimask_output=True)[0]
        best = out["iou_predictions"].argmax(dim=1)
        rows = torch.arange(len(boxes))
        logits = sam.postprocess_masks(out["low_res_logits"], record["image"].shape[-2:], (height, width))
        logits = logits[rows, best]  # (K, H, W)
        assert answer.masks.shape == (height, width, len(boxes)) and answer.masks.flags.f_contiguous
        agree = (answer.masks.transpose(2, 0, 1) == (logits > 0).numpy()).mean()
        assert agree > 0.999  # only pixels with logits within float noise of 0 may differ
        np.testing.assert_allclose(answer.iou_pred, out["iou_predictions"][rows, best].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer.stability, stability_scores(logits).numpy(), atol=1e-3)
        assert np.isnan(answer.prompted_stability).all()


def test_a_mask_prompt_is_scored_only_where_given(tiny_runner):
    image = _prompts(tiny_runner, 4, 100, 120, [[10, 10, 60, 90], [50, 20, 110, 80]])
    provided = np.zeros((100, 120), dtype=bool)
    provided[20:80, 15:55] = True
    image.mask_prompts = [provided, None]
    answer = tiny_runner.segment([image])[0]
    assert 0.0 <= answer.prompted_stability[0] <= 1.0 and np.isnan(answer.prompted_stability[1])


def test_encoder_runs_once_per_batch_of_images(tiny_runner):
    calls = []
    hook = tiny_runner.model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        images = [_prompts(tiny_runner, s, 64, 96, [[0, 0, 40, 40], [20, 10, 90, 60], [5, 5, 30, 50]])
                  for s in range(3)]
        tiny_runner.segment(images)
    finally:
        hook.remove()
    assert calls == [3]


def test_empty_logits_have_stability_zero_not_nan():
    logits = torch.full((2, 8, 8), -5.0)
    logits[1, 2:6, 2:6] = 5.0
    assert stability_scores(logits).tolist() == [0.0, 1.0]
