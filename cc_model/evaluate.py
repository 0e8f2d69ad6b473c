"""The ``evaluate`` stage: DreamBench scores of the trained checkpoint (``python -m cc_model.evaluate [params.yaml]``).

For every DreamBench subject (sources.dreambench_root) the first photo is the reference. Its
subject cut-out x^ (SAM from a box around the whole photo, the background painted
``embed.background_rgb``, as in training) conditions the model, and images are generated
(cc_model.inference) for

- the *reconstruction* prompt: the training caption (``export.caption_template``);
- the *editing* prompts: the subject's DreamBench list (live subjects take the live list),
  each with a category: scene, accessorisation, style, shape;

``evaluate.images_per_prompt`` images each, from seeds ``sampling.seed + n`` in a fixed order,
so an image does not depend on the batch it was generated in. Every image is scored:

- ``clip_t``: CLIP cosine of the image and the prompt with the placeholder word removed;
- ``clip_i`` / ``dino_i``: CLIP / DINO cosine of the generated subject and each of the subject's
  photos, averaged; both sides are SAM cut-outs when ``evaluate.segment_subjects`` is on (the
  paper's protocol), else whole images.

Writes under ``evaluate.out_dir``: ``scores.parquet`` (one row per image, with the image),
``stats.json`` (a DVC metric: CT and E-CI/E-DI over the editing images, R-CI/R-DI over the reconstruction
images, and per category), ``grid.png`` (the first image of each prompt of the first subject)
and ``timing.json``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

from flows.runtime import configure

configure()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from cc_model.backbones import clip_pixels, load_backbones  # noqa: E402
from cc_model.checkpoint import load_model  # noqa: E402
from cc_model.data import subject_bbox, to_tensor  # noqa: E402
from cc_model.dreambench import Subject, read_dreambench  # noqa: E402
from cc_model.inference import generate  # noqa: E402
from cc_model.metrics import clip_image_embeddings, clip_text_embeddings, dino_embeddings, load_metric_models  # noqa: E402
from cc_model.model import cast_frozen  # noqa: E402
from cc_model.training import resolve_device  # noqa: E402
from flows.config.params import Params, load_params  # noqa: E402
from flows.embed.preprocess import segment_subject  # noqa: E402
from flows.progress import Progress  # noqa: E402
from flows.schemas import EVALUATION  # noqa: E402
from flows.segment.sam_infer import ImagePrompts, SamRunner  # noqa: E402
from flows.segment.sam_model import sam_for_params  # noqa: E402
from flows.tables import TableWriter, write_stats  # noqa: E402

log = logging.getLogger("flows.evaluate")
BOX_MARGIN = 0.02  # SAM's box prompt: the whole image less this share on each side


@dataclass(frozen=True)
class Job:
    subject: Subject
    kind: str  # reconstruction | editing
    category: str
    prompt: str  # with the placeholder word
    clip_t_text: str  # without it
    sample: int
    seed: int


class SubjectCutter:
    """Subject cut-outs x^ of whole photos: SAM from a box around the image, else the photo itself."""

    def __init__(self, runner: SamRunner | None, background_rgb):
        self.runner, self.background = runner, tuple(int(v) for v in background_rgb)

    def cut(self, images: list[Image.Image]) -> list[Image.Image]:
        if self.runner is None:
            return [self.square(image) for image in images]
        prompts = []
        for image in images:
            w, h = image.size
            box = np.array([[BOX_MARGIN * w, BOX_MARGIN * h, (1 - BOX_MARGIN) * w, (1 - BOX_MARGIN) * h]])
            prompts.append(ImagePrompts(resized=self.runner.resize(np.asarray(image.convert("RGB"))),
                                        original_size=(h, w), boxes=box, mask_prompts=[None]))
        out = []
        for image, masks in zip(images, self.runner.segment(prompts)):
            mask = masks.masks[:, :, 0].astype(bool)
            # an empty mask (possible with random weights) leaves the whole photo, padded square
            out.append(segment_subject(image, mask, subject_bbox(mask), self.background) if mask.any()
                       else self.square(image))
        return out

    def square(self, image: Image.Image) -> Image.Image:
        """The whole photo on a square of the background colour (the model's inputs are squares, not squashed)."""
        mask = np.ones((image.height, image.width), dtype=bool)
        return segment_subject(image, mask, (0.0, 0.0, float(image.width), float(image.height)), self.background)


def plan_jobs(subjects: list[Subject], bench, params: Params) -> list[Job]:
    placeholder, seed, jobs = params.model.placeholder_token, params.sampling.seed, []
    template = params.export.caption_template
    for subject in subjects:
        prompts = [("reconstruction", "reconstruction", template.format(placeholder=placeholder,
                                                                         class_name=subject.class_name),
                    " ".join(template.format(placeholder="", class_name=subject.class_name).split()))]
        prompts += [("editing", p.category, p.text(placeholder, subject.class_name), p.text("", subject.class_name))
                    for p in bench.prompts_for(subject)]
        for kind, category, prompt, plain in prompts:
            for sample in range(params.evaluate.images_per_prompt):
                jobs.append(Job(subject, kind, category, prompt, plain, sample, seed + len(jobs)))
    return jobs


def summarise(rows: list[dict]) -> dict:
    """CT, R-CI, E-CI, R-DI, E-DI and the same per editing category."""
    def mean(name, chosen):
        return round(float(np.mean([r[name] for r in chosen])), 6) if chosen else None

    editing = [r for r in rows if r["kind"] == "editing"]
    recon = [r for r in rows if r["kind"] == "reconstruction"]
    metrics = {"CT": mean("clip_t", editing), "R-CI": mean("clip_i", recon), "E-CI": mean("clip_i", editing),
               "R-DI": mean("dino_i", recon), "E-DI": mean("dino_i", editing),
               "images": len(rows), "subjects": len({r["subject"] for r in rows})}
    metrics["by_category"] = {
        category: {"CT": mean("clip_t", chosen), "E-CI": mean("clip_i", chosen), "E-DI": mean("dino_i", chosen),
                   "images": len(chosen)}
        for category in sorted({r["category"] for r in editing})
        if (chosen := [r for r in editing if r["category"] == category])}
    return metrics


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    side = images[0].width
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (side * min(columns, len(images)), side * rows), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    return grid


def evaluate_checkpoint(params: Params, *, checkpoint: Path) -> dict:
    config = params.evaluate
    out_dir = Path(config.out_dir)
    device = resolve_device(config.device)
    bench = read_dreambench(params.sources.dreambench_root, live_classes=config.live_classes)
    metric = load_metric_models(config, device)  # first: a missing DINO or CLIP fails before minutes of loading
    # this machine's backbone paths (params), not the ones stored in a checkpoint trained elsewhere
    model = load_model(checkpoint, backbones=load_backbones(params.model.backbone)).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        cast_frozen(model, dtype)
    runner = SamRunner(sam_for_params(params.segment), device) if config.segment_subjects else None
    cutter = SubjectCutter(runner, params.embed.background_rgb)

    subjects = list(bench.subjects)
    photos = {s.name: [Image.open(p).convert("RGB") for p in s.images] for s in subjects}
    cut_photos = {name: cutter.cut(images) for name, images in photos.items()}
    reference_clip = {name: clip_image_embeddings(metric, images) for name, images in cut_photos.items()}
    reference_dino = {name: dino_embeddings(metric, images) for name, images in cut_photos.items()}
    size = model.image_encoder.config.image_size
    conditioning = {name: clip_pixels(to_tensor(images[0].resize((size, size), Image.BICUBIC))[None], size)[0]
                    for name, images in cut_photos.items()}  # x^ of the first photo, as the model trained on

    jobs = plan_jobs(subjects, bench, params)
    progress = Progress("evaluate", len(jobs), unit="images")
    rows, firsts = [], []
    latent = model.unet.config.sample_size
    with TableWriter(out_dir / "scores.parquet", EVALUATION, buffer_rows=256) as writer:
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start:start + config.batch_size]
            latents = torch.stack([torch.randn(model.unet.config.in_channels, latent, latent,
                                               generator=torch.Generator().manual_seed(job.seed)) for job in batch])
            references = torch.stack([conditioning[job.subject.name] for job in batch]).to(device, dtype)
            out = generate(model, references, [job.prompt for job in batch], params=params.sampling, latents=latents)
            images = [Image.fromarray((im.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
                      for im in out.images]
            cut = cutter.cut(images)
            clip_i = clip_image_embeddings(metric, cut)
            dino_i = dino_embeddings(metric, cut)
            clip_t = (clip_image_embeddings(metric, images) *
                      clip_text_embeddings(metric, [job.clip_t_text for job in batch])).sum(dim=-1)
            for k, (job, image) in enumerate(zip(batch, images)):
                row = {"subject": job.subject.name, "class_name": job.subject.class_name, "kind": job.kind,
                       "category": job.category, "prompt": job.prompt, "sample": job.sample, "seed": job.seed,
                       "clip_t": float(clip_t[k]),
                       "clip_i": float((reference_clip[job.subject.name] @ clip_i[k]).mean()),
                       "dino_i": float((reference_dino[job.subject.name] @ dino_i[k]).mean()),
                       "image_jpeg": _jpeg(image)}
                writer.write_row(row)
                rows.append({n: v for n, v in row.items() if n != "image_jpeg"})
                if job.subject is subjects[0] and job.sample == 0:
                    firsts.append(image)
            progress.update(len(batch))
    seconds = progress.close()
    if firsts:
        _grid(firsts).save(out_dir / "grid.png")
    random = model.profile != "sd15" or metric.random_weights or (runner is not None and runner.random_weights)
    segmentation = "SAM, prompted with a box around the whole image" if runner is not None else "none (whole images)"
    metrics = summarise(rows) | {"random_weights": random, "subject_segmentation": segmentation}
    if metrics["random_weights"]:
        log.warning("evaluate: random weights (model or metric models): the scores are meaningless")
    return write_stats(out_dir, metrics, timing={"seconds": round(seconds, 3), "device": str(device),
                                                 "images_per_s": round(len(jobs) / max(seconds, 1e-9), 3)})


@task(cache_policy=NO_CACHE)
def evaluate_task(params: Params) -> dict:
    return evaluate_checkpoint(params, checkpoint=Path(params.train.out_dir) / "checkpoint")


@flow(name="evaluate")
def evaluate_flow(params_path: str = "params.yaml") -> dict:
    """Generate DreamBench images with the trained checkpoint and score them; data/evaluate/."""
    metrics = evaluate_task(load_params(params_path))
    get_run_logger().info("evaluate: %s", {k: v for k, v in metrics.items() if k != "by_category"})
    return metrics


def main(params_path: str = "params.yaml") -> None:
    evaluate_flow(params_path)


if __name__ == "__main__":
    from flows.cli import run_stage

    run_stage(main)


__all__ = ["Job", "SubjectCutter", "evaluate_checkpoint", "evaluate_flow", "plan_jobs", "summarise"]
