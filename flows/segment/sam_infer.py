"""Batched SAM inference: one image-encoder pass per image, all its boxes decoded together.

The pre- and post-processing are SAM's own (``ResizeLongestSide``, pixel normalisation and
zero padding to a square, bilinear upscaling of the low-res logits, threshold 0), but done
for a batch of images at once. The mask decoder runs for every box of the batch in one call
(:func:`decode_prompts`, SAM's ``MaskDecoder.predict_masks`` with a gather in place of the
per-image ``repeat_interleave``), so its launch cost does not grow with the number of images.

On CUDA the models run under bf16 autocast; ``launch`` only queues the GPU work and starts the
copies back, so the caller can encode the previous batch's RLEs while the GPU computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide

from flows.segment.sam_model import LoadedSam

STABILITY_OFFSET = 1.0  # logit offset of SAM's stability score (SamAutomaticMaskGenerator's default)
MASK_PROMPT_LOGIT = 20.0  # a binary mask given as a mask prompt becomes logits of +-this
MAX_PROMPTS_PER_DECODE = 64  # boxes per mask-decoder call (bounds the (n, C, e, e) activations)


@dataclass
class ImagePrompts:
    """One image, resized for the encoder, and the boxes to segment in it."""

    resized: np.ndarray  # (h', w', 3) uint8 RGB, longest side = the encoder's image_size
    original_size: tuple[int, int]  # (H, W) of the decoded image
    boxes: np.ndarray  # (K, 4) float x0, y0, x1, y1 in original-image pixels
    mask_prompts: list[np.ndarray | None]  # per box: a (H, W) bool mask to score (refine), or None


@dataclass
class ImageMasks:
    """SAM's answer for the K boxes of one image."""

    masks: np.ndarray  # (H, W, K) uint8, Fortran order: what pycocotools.mask.encode takes
    stability: np.ndarray  # (K,) stability score of each chosen mask (0 for an empty mask)
    iou_pred: np.ndarray  # (K,) SAM's predicted IoU of each chosen mask
    prompted_stability: np.ndarray  # (K,) stability with the mask prompt added; NaN without one


class PendingBatch:
    """GPU work queued by :meth:`SamRunner.launch`; :meth:`result` waits for it."""

    def __init__(self, parts: list[dict[str, torch.Tensor]], done: torch.cuda.Event | None):
        self._parts, self._done = parts, done

    def result(self) -> list[ImageMasks]:
        if self._done is not None:
            self._done.synchronize()
        out = []
        for part in self._parts:
            kwh = part["masks"].numpy()  # (K, W, H) bool, C order
            out.append(ImageMasks(
                masks=kwh.view(np.uint8).transpose(2, 1, 0),  # (H, W, K), Fortran order, no copy
                stability=part["stability"].numpy(), iou_pred=part["iou_pred"].numpy(),
                prompted_stability=part["prompted_stability"].numpy()))
        return out


def stability_scores(logits: torch.Tensor) -> torch.Tensor:
    """SAM's stability score of (N, H, W) logits; an empty mask (no pixel above -offset) scores 0."""
    score = calculate_stability_score(logits, 0.0, STABILITY_OFFSET)
    return torch.nan_to_num(score, nan=0.0)


def decode_prompts(model: Sam, embeddings: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                   mask_inputs: torch.Tensor | None, *, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder + mask decoder for boxes of several images in one call.

    embeddings (B, C, e, e); image_index (N,) the image of each box; boxes (N, 4) in the
    encoder's input frame; mask_inputs (N, 1, 4e, 4e) logits or None. Returns the low-res
    logits (N, M, 4e, 4e) and predicted IoUs (N, M), M = 3 with multimask else 1: the same
    numbers as ``model.mask_decoder`` called once per image.
    """
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=mask_inputs)  # (N, 2, C), (N, C, e, e)
    dec = model.mask_decoder
    n = boxes.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (1 + T, C)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)  # (N, 1 + T + 2, C)
    src = embeddings[image_index] + dense  # (N, C, e, e): the gather that replaces repeat_interleave
    pos_src = model.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)  # (N, C, e, e)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)  # hs (N, tokens, C); src (N, e*e, C)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + dec.num_mask_tokens, :]  # (N, T, C)
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (N, C/8, 4e, 4e)
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
                           dim=1)  # (N, T, C/8)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # (N, T, 4e, 4e)
    iou_pred = dec.iou_prediction_head(iou_token_out)  # (N, T)
    keep = slice(1, None) if multimask else slice(0, 1)  # as MaskDecoder.forward
    return masks[:, keep], iou_pred[:, keep]


class SamRunner:
    """A loaded SAM on a device, segmenting batches of :class:`ImagePrompts`."""

    def __init__(self, sam: LoadedSam, device: str | torch.device):
        self.device = torch.device(device)
        self.model: Sam = sam.model.to(self.device).eval()
        self.model_id, self.random_weights = sam.model_id, sam.random_weights
        self.image_size = sam.spec.image_size
        self.transform = ResizeLongestSide(self.image_size)
        self.use_bf16 = self.device.type == "cuda"  # bf16 autocast on GPU; float32 on CPU

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h', w', 3) uint8 with the longest side = image_size (SAM's apply_image)."""
        return self.transform.apply_image(rgb)

    def autocast(self):
        """bf16 autocast on CUDA; a no-op on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16)

    def to_device(self, array) -> torch.Tensor:
        """Host data to the device without waiting: from pinned memory, non-blocking.

        A plain (pageable) copy would make the host wait for every kernel queued before it,
        and the next batch could not be queued while this one computes.
        """
        tensor = torch.as_tensor(array)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def preprocess(self, resized: list[np.ndarray]) -> torch.Tensor:
        """Normalised, zero-padded (B, 3, S, S) float32 encoder input on the device (Sam.preprocess)."""
        s = self.image_size
        pinned = self.device.type == "cuda"  # the caching host allocator reuses a block once its copy is done
        batch = torch.zeros((len(resized), s, s, 3), dtype=torch.uint8, pin_memory=pinned)  # (B, S, S, 3)
        for i, image in enumerate(resized):
            batch[i, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, S, S)
        x = (x - self.model.pixel_mean) / self.model.pixel_std
        for i, image in enumerate(resized):  # SAM pads after normalising: the padding is 0
            x[i, :, image.shape[0]:, :] = 0
            x[i, :, :, image.shape[1]:] = 0
        return x

    @torch.inference_mode()
    def embed(self, resized: list[np.ndarray]) -> torch.Tensor:
        """Image embeddings (B, C, e, e): the encoder runs once for the whole batch."""
        with self.autocast():
            return self.model.image_encoder(self.preprocess(resized))

    def _mask_prompt(self, mask: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
        """A (H, W) bool mask as SAM mask-prompt logits (1, 4e, 4e) in the padded input frame."""
        m = self.to_device(mask)[None, None].float()  # (1, 1, H, W)
        m = F.interpolate(m, input_size, mode="bilinear", align_corners=False)
        m = F.pad(m, (0, self.image_size - input_size[1], 0, self.image_size - input_size[0]))  # (1, 1, S, S)
        low = self.model.prompt_encoder.mask_input_size
        m = F.interpolate(m, low, mode="area")  # (1, 1, 4e, 4e), fractions at the boundary
        return (m[0] * 2 - 1) * MASK_PROMPT_LOGIT

    def _decode_best(self, embeddings, image_index, boxes, mask_inputs, *, multimask):
        """Best low-res logits (N, 4e, 4e) by predicted IoU, and that IoU (N,), in chunks."""
        logits, ious = [], []
        for start in range(0, boxes.shape[0], MAX_PROMPTS_PER_DECODE):
            chunk = slice(start, start + MAX_PROMPTS_PER_DECODE)
            with self.autocast():
                low, iou = decode_prompts(self.model, embeddings, image_index[chunk], boxes[chunk],
                                          None if mask_inputs is None else mask_inputs[chunk],
                                          multimask=multimask)  # (n, M, 4e, 4e), (n, M)
            best = iou.argmax(dim=1)
            rows = torch.arange(low.shape[0], device=low.device)
            logits.append(low[rows, best].float())
            ious.append(iou[rows, best].float())
        return torch.cat(logits), torch.cat(ious)

    def _upscale(self, low: torch.Tensor, input_size, original_size) -> torch.Tensor:
        """(K, 4e, 4e) low-res logits -> (K, H, W) logits at image size (Sam.postprocess_masks)."""
        x = F.interpolate(low[:, None], (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        return F.interpolate(x, original_size, mode="bilinear", align_corners=False)[:, 0]

    @torch.inference_mode()
    def launch(self, images: list[ImagePrompts]) -> PendingBatch:
        """Queue encoder, decoder and post-processing for a batch; nothing waits for the GPU here."""
        embeddings = self.embed([im.resized for im in images])  # (B, C, e, e)
        input_sizes = [im.resized.shape[:2] for im in images]
        counts = [len(im.boxes) for im in images]
        image_index = self.to_device(np.repeat(np.arange(len(images)), counts))  # (N,)
        boxes = np.concatenate([self.transform.apply_boxes(im.boxes, im.original_size) for im in images])
        boxes = self.to_device(boxes.astype(np.float32))  # (N, 4) in the encoder's input frame
        low, iou = self._decode_best(embeddings, image_index, boxes, None, multimask=True)  # (N, 4e, 4e), (N,)

        # Refine: the same boxes with the provided mask added as a mask prompt, single output.
        prompted = [(j, mask, input_sizes[i]) for i, j, mask in _iter_mask_prompts(images)]
        prompted_low = None
        if prompted:
            at = self.to_device(np.array([j for j, _, _ in prompted]))
            mask_in = torch.stack([self._mask_prompt(m, size) for _, m, size in prompted])  # (P, 1, 4e, 4e)
            prompted_low, _ = self._decode_best(embeddings, image_index[at], boxes[at], mask_in, multimask=False)
            prompt_pos = {j: p for p, (j, _, _) in enumerate(prompted)}

        parts, offset = [], 0
        for i, im in enumerate(images):
            k = counts[i]
            logits = self._upscale(low[offset:offset + k], input_sizes[i], im.original_size)  # (K, H, W)
            prompted_stab = torch.full((k,), float("nan"), device=self.device)
            for local in range(k):
                if prompted_low is not None and offset + local in prompt_pos:
                    p = prompt_pos[offset + local]
                    up = self._upscale(prompted_low[p:p + 1], input_sizes[i], im.original_size)
                    prompted_stab[local] = stability_scores(up)[0]
            part = {
                "masks": (logits > self.model.mask_threshold).transpose(1, 2).contiguous(),  # (K, W, H)
                "stability": stability_scores(logits), "iou_pred": iou[offset:offset + k],
                "prompted_stability": prompted_stab,
            }
            parts.append({name: t.to("cpu", non_blocking=True) for name, t in part.items()})
            offset += k
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return PendingBatch(parts, done)

    def segment(self, images: list[ImagePrompts]) -> list[ImageMasks]:
        """Launch and wait: the synchronous form of :meth:`launch`."""
        return self.launch(images).result()


def _iter_mask_prompts(images: list[ImagePrompts]):
    """(image position, global box position, mask) for every box that carries a mask prompt."""
    offset = 0
    for i, im in enumerate(images):
        for local, mask in enumerate(im.mask_prompts):
            if mask is not None:
                yield i, offset + local, mask
        offset += len(im.boxes)
