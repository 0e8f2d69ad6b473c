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
  paper's protocol), else whole images. The switch is the metrics' only: the conditioning photo
  is always SAM's cut-out, the input the model trained on. SAM's box prompt is the box of the generated image's
  last subject-location mask (``sampling.subject_location``), so a small subject in a scene is
  cut out rather than the scene; photos, and images without a location, get a box around the
  whole image.

Writes under ``evaluate.out_dir``: ``scores.parquet`` (one row per image, with the image),
``stats.json`` (a DVC metric: CT and E-CI/E-DI over the editing images, R-CI/R-DI over the reconstruction
images, and per category), ``grid.png`` (the first image of each prompt of the first subject)
and ``timing.json``. Images are generated in pieces of 16 batches, each written to
``.work/``; a run that fails keeps its finished pieces, and the rerun with the same checkpoint,
DreamBench files, params, device type, libraries and code generates only the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
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
from cc_model.data import pad_square, subject_bbox, to_tensor  # noqa: E402
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
from flows.resume import ResumableWork, device_identity, file_identity, library_versions  # noqa: E402
from flows.tables import TableWriter, concat_tables, iter_rows, write_stats  # noqa: E402

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


def location_box(location: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """SAM's box prompt (1, 4) x0, y0, x1, y1 for an image: around its subject location (a binary
    (h, w) mask at any resolution, e.g. a generated image's last subject-location mask) scaled to
    the image, else around the whole image less BOX_MARGIN per side. A location that is empty or
    covers everything locates nothing, so it gets the whole-image box too."""
    if location is not None and location.any() and not location.all():
        rows, cols = np.flatnonzero(location.any(axis=1)), np.flatnonzero(location.any(axis=0))
        sy, sx = height / location.shape[0], width / location.shape[1]
        return np.array([[cols[0] * sx, rows[0] * sy, (cols[-1] + 1) * sx, (rows[-1] + 1) * sy]])
    return np.array([[BOX_MARGIN * width, BOX_MARGIN * height, (1 - BOX_MARGIN) * width, (1 - BOX_MARGIN) * height]])


class SubjectCutter:
    """Subject cut-outs x^: SAM from a box around the subject location when there is one (generated
    images), else around the whole image (photos)."""

    def __init__(self, runner: SamRunner, background_rgb):
        self.runner, self.background = runner, tuple(int(v) for v in background_rgb)

    def cut(self, images: list[Image.Image], locations: list[np.ndarray | None] | None = None) -> list[Image.Image]:
        """``locations``: per image a binary subject-location mask (cc_model.inference.Generated.location), or None."""
        prompts = []
        for k, image in enumerate(images):
            w, h = image.size
            box = location_box(None if locations is None else locations[k], w, h)
            prompts.append(ImagePrompts(resized=self.runner.resize(np.asarray(image.convert("RGB"))),
                                        original_size=(h, w), boxes=box, mask_prompts=[None]))
        out = []
        for image, masks in zip(images, self.runner.segment(prompts)):
            mask = masks.masks[:, :, 0].astype(bool)
            # an empty mask (possible with random weights) leaves the whole photo, padded square
            out.append(segment_subject(image, mask, subject_bbox(mask), self.background) if mask.any()
                       else pad_square(image, self.background))
        return out

    def for_metrics(self, images: list[Image.Image], segment: bool,
                    locations: list[np.ndarray | None] | None = None) -> list[Image.Image]:
        """What CLIP-I and DINO-I compare: the cut-outs, or (``evaluate.segment_subjects`` off) whole images, padded square."""
        return self.cut(images, locations) if segment else [pad_square(image, self.background) for image in images]


def plan_jobs(subjects: list[Subject], bench, params: Params, *, placeholder: str) -> list[Job]:
    """``placeholder``: the checkpoint's placeholder word, the one its S+ tokens replace."""
    seed, jobs = params.sampling.seed, []
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


PIECE_BATCHES = 16  # batches per resumable piece of the work


def work_key(params: Params, *, checkpoint: Path, device: torch.device) -> str:
    """What finished pieces of an interrupted run must have been made from to be kept."""
    digest = hashlib.sha256()
    what = {"evaluate": dataclasses.asdict(dataclasses.replace(params.evaluate, device="auto", out_dir="")),
            "sampling": dataclasses.asdict(params.sampling), "backbone": dataclasses.asdict(params.model.backbone),
            "placeholder": params.model.placeholder_token, "caption": params.export.caption_template,
            "background": params.embed.background_rgb, "segment": dataclasses.asdict(params.segment),
            "device": device_identity(device), "libraries": library_versions("torch", "diffusers", "transformers", "open_clip_torch")}
    digest.update(json.dumps(what, sort_keys=True, default=str).encode())
    files = [*sorted(Path(checkpoint).glob("*")), *sorted(Path(params.sources.dreambench_root).rglob("*"))]
    for path in files + sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f"{file_identity(path)}\n".encode() if path.suffix != ".py" else path.read_bytes())
    return digest.hexdigest()


class Scorer:
    """Generates a batch of jobs' images and scores them (see the module docstring)."""

    def __init__(self, params: Params, *, checkpoint: Path, subjects: list[Subject], device: torch.device):
        config = params.evaluate
        self.params, self.device = params, device
        self.metric = load_metric_models(config, device)  # first: a missing DINO or CLIP fails before minutes of loading
        # this machine's backbone paths (params), not the ones stored in a checkpoint trained elsewhere
        self.model = load_model(checkpoint, backbones=load_backbones(params.model.backbone)).to(device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype != torch.float32:
            cast_frozen(self.model, self.dtype)
        # SAM always cuts out the conditioning photo, as training's x^ is; segment_subjects is the metrics' choice
        self.runner = SamRunner(sam_for_params(params.segment), device)
        self.cutter = SubjectCutter(self.runner, params.embed.background_rgb)
        self.segment_metrics = config.segment_subjects
        photos = {s.name: [Image.open(p).convert("RGB") for p in s.images] for s in subjects}
        compared = {name: self.cutter.for_metrics(images, self.segment_metrics) for name, images in photos.items()}
        self.reference_clip = {name: clip_image_embeddings(self.metric, im) for name, im in compared.items()}
        self.reference_dino = {name: dino_embeddings(self.metric, im) for name, im in compared.items()}
        size = self.model.image_encoder.config.image_size
        cut_first = {name: compared[name][0] if self.segment_metrics else self.cutter.cut(images[:1])[0]
                     for name, images in photos.items()}  # SAM once per photo
        self.conditioning = {name: clip_pixels(to_tensor(im.resize((size, size), Image.BICUBIC))[None], size)[0]
                             for name, im in cut_first.items()}  # x^ of the first photo, as the model trained on

    @property
    def random_weights(self) -> bool:
        return (self.model.profile != "sd15" or self.metric.random_weights
                or self.runner.random_weights)

    def score(self, batch: list[Job]) -> list[dict]:
        unet = self.model.unet.config
        latents = torch.stack([torch.randn(unet.in_channels, unet.sample_size, unet.sample_size,
                                           generator=torch.Generator().manual_seed(job.seed)) for job in batch])
        references = torch.stack([self.conditioning[job.subject.name] for job in batch]).to(self.device, self.dtype)
        out = generate(self.model, references, [job.prompt for job in batch], params=self.params.sampling,
                       latents=latents)
        images = [Image.fromarray((im.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
                  for im in out.images]
        locations = None if out.location is None else list(out.location.bool().cpu().numpy())
        cut = self.cutter.for_metrics(images, self.segment_metrics, locations)
        clip_i, dino_i = clip_image_embeddings(self.metric, cut), dino_embeddings(self.metric, cut)
        clip_t = (clip_image_embeddings(self.metric, images) *
                  clip_text_embeddings(self.metric, [job.clip_t_text for job in batch])).sum(dim=-1)
        return [{"subject": job.subject.name, "class_name": job.subject.class_name, "kind": job.kind,
                 "category": job.category, "prompt": job.prompt, "sample": job.sample, "seed": job.seed,
                 "clip_t": float(clip_t[k]), "clip_i": float((self.reference_clip[job.subject.name] @ clip_i[k]).mean()),
                 "dino_i": float((self.reference_dino[job.subject.name] @ dino_i[k]).mean()),
                 "image_jpeg": _jpeg(image)} for k, (job, image) in enumerate(zip(batch, images))]


def evaluate_checkpoint(params: Params, *, checkpoint: Path) -> dict:
    """Generate and score every job; finished pieces of an interrupted run (same key) are kept in .work/."""
    config = params.evaluate
    out_dir = Path(config.out_dir)
    device = resolve_device(config.device)
    bench = read_dreambench(params.sources.dreambench_root, live_classes=config.live_classes)
    subjects = list(bench.subjects)
    scorer = Scorer(params, checkpoint=checkpoint, subjects=subjects, device=device)
    placeholder = scorer.model.params.placeholder_token  # the model's own: a prompt without it gets no S+
    if placeholder != params.model.placeholder_token:
        log.warning("evaluate: the checkpoint's placeholder is %r, model.placeholder_token is %r: prompts use %r",
                    placeholder, params.model.placeholder_token, placeholder)
    jobs = plan_jobs(subjects, bench, params, placeholder=placeholder)
    size = config.batch_size * PIECE_BATCHES
    pieces = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    work = ResumableWork(out_dir / ".work", work_key(params, checkpoint=checkpoint, device=device))
    work.open()
    kept = len(work.done_prefix("scores", limit=len(pieces)))
    if kept:
        log.info("evaluate: %d of %d pieces kept from an interrupted run", kept, len(pieces))
    progress = Progress("evaluate", sum(len(p) for p in pieces[kept:]), unit="images")
    parts = [work.folder / f"scores-{p:05d}.parquet" for p in range(len(pieces))]
    for p in range(kept, len(pieces)):
        with TableWriter(parts[p], EVALUATION, buffer_rows=256) as writer:
            for start in range(0, len(pieces[p]), config.batch_size):
                batch = pieces[p][start:start + config.batch_size]
                writer.write_rows(scorer.score(batch))
                progress.update(len(batch))
        work.mark_done(f"scores-{p:05d}", {"rows": len(pieces[p])}, [parts[p]])
    seconds = progress.close()
    concat_tables(parts, out_dir / "scores.parquet", EVALUATION)
    rows = [r for part in parts for r in iter_rows(part, EVALUATION, columns=EVALUATION.names[:-1])]
    firsts = []  # the first image of each prompt of the first subject, whose jobs come first
    for r in iter_rows(out_dir / "scores.parquet", EVALUATION, columns=["subject", "sample", "image_jpeg"],
                       batch_rows=256):
        if r["subject"] != subjects[0].name:
            break
        if r["sample"] == 0:
            firsts.append(Image.open(io.BytesIO(r["image_jpeg"])).convert("RGB"))
    if firsts:
        _grid(firsts).save(out_dir / "grid.png")
    segmentation = ("SAM, prompted with the box of each generated image's subject location (photos, and images "
                    "without one: a box around the whole image)" if scorer.segment_metrics else
                    "none for the metrics (whole images); SAM cuts out the conditioning photo")
    metrics = summarise(rows) | {"random_weights": scorer.random_weights, "subject_segmentation": segmentation}
    if metrics["random_weights"]:
        log.warning("evaluate: random weights (model, metric models or SAM): the scores are meaningless")
    work.finish()
    generated = sum(len(p) for p in pieces[kept:])
    return write_stats(out_dir, metrics, timing={"seconds": round(seconds, 3), "device": str(device),
                                                 "images_generated": generated,
                                                 "images_per_s": round(generated / max(seconds, 1e-9), 3)})


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


__all__ = ["Job", "Scorer", "SubjectCutter", "location_box", "evaluate_checkpoint", "evaluate_flow", "plan_jobs", "summarise",
           "work_key"]
