"""Generate the whole sample with plain functions (the Prefect flow wraps the same steps).

Output, under ``out_dir``::

    mvimgnet/  mvimgnet_masks/  openimages/  dreambench/  faults.json

Everything is written into ``<out_dir>.partial`` and renamed into place at the end, so a reader
never sees half a sample; a previous output is removed just before the rename, so a failed run
leaves the last good sample untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from flows import ids
from flows.config.params import SampleParams
from flows.sample import dreambench, faults, mvimgnet, openimages
from flows.sample.plan import ImagePlan, ObjectPlan, SamplePlan, plan_sample

log = logging.getLogger(__name__)

SCRATCH = "_scratch"  # render cut-outs and per-image CSV rows; removed before publishing
IMAGES_PER_SHARD = 4  # OpenImages images per task


@dataclasses.dataclass(frozen=True)
class Roots:
    """The data-set roots inside one output folder."""

    base: Path

    @property
    def mvimgnet(self) -> Path:
        return self.base / "mvimgnet"

    @property
    def mvimgnet_masks(self) -> Path:
        return self.base / "mvimgnet_masks"

    @property
    def openimages(self) -> Path:
        return self.base / "openimages"

    @property
    def dreambench(self) -> Path:
        return self.base / "dreambench"

    @property
    def scratch(self) -> Path:
        return self.base / SCRATCH


def staging_dir(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def begin(target: Path) -> Path:
    """A fresh, empty staging folder beside ``target`` (a leftover from a killed run is removed)."""
    staging = staging_dir(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, target: Path) -> Path:
    """Drop the scratch folder, remove the previous output and rename the staging folder into place."""
    shutil.rmtree(staging / SCRATCH, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def generate_object(obj: ObjectPlan, params: SampleParams, base: Path) -> Path:
    """Render and write one MVImgNet object; return its cut-out manifest path."""
    roots = Roots(base)
    manifest = mvimgnet.write_object(obj, params.frame_width, params.frame_height, roots.mvimgnet,
                                     roots.mvimgnet_masks, roots.scratch)
    log.info("object %d/%d %s/%s (%s, %d views) written", obj.index + 1, params.n_objects,
             obj.class_id, obj.object_id, obj.render.kind, obj.n_views)
    return manifest


def generate_openimages_shard(images: list[ImagePlan], manifests: list[Path], params: SampleParams,
                              base: Path) -> list[Path]:
    """Write a few OpenImages images; return the paths of their CSV-row files."""
    roots = Roots(base)
    cutouts = openimages.load_cutouts(manifests)
    paths = [openimages.write_image(img, cutouts, roots.openimages, params.openimages_mask_scale, roots.scratch)
             for img in images]
    log.info("openimages images %s written", ", ".join(img.image_id for img in images))
    return paths


def generate_dreambench_subject(plan: SamplePlan, index: int, params: SampleParams, base: Path) -> Path:
    subject = plan.dreambench[index]
    folder = dreambench.write_subject(subject, params.dreambench_images_per_subject, Roots(base).dreambench)
    log.info("dreambench subject %s written", subject.name)
    return folder


def mvimgnet_fault_records(plan: SamplePlan) -> list[faults.FaultRecord]:
    out = []
    for obj in plan.objects:
        frames = [(v, "too_few_views") for v in range(obj.n_views)] if obj.too_few_views else []
        for v, fault in list(obj.frame_faults) + frames:
            name = mvimgnet.frame_name(v)
            out.append(faults.record(fault, ids.MVIMGNET, f"{obj.class_id}/{obj.object_id}/images/{name}",
                                     ids.mvimgnet_frame_id(obj.class_id, obj.object_id, name)))
    return out


def finish(plan: SamplePlan, params: SampleParams, base: Path, rows_paths: list[Path]) -> Path:
    """Write the shared files (class tables, CSVs, prompts, faults.json); return faults.json."""
    roots = Roots(base)
    mvimgnet.write_categories(roots.mvimgnet)
    records = openimages.finish(plan.openimages, rows_paths, roots.openimages)
    dreambench.write_prompts(plan.dreambench, roots.dreambench)
    path = base / "faults.json"
    faults.write_faults_json(mvimgnet_fault_records(plan) + records, path)
    return path


def shards(plan: SamplePlan) -> list[list[ImagePlan]]:
    images = list(plan.openimages.images)
    return [images[i:i + IMAGES_PER_SHARD] for i in range(0, len(images), IMAGES_PER_SHARD)]


def generate_sample(params: SampleParams, out_dir: str | Path | None = None) -> Path:
    """Generate the sample sequentially into ``out_dir`` (default ``params.out_dir``)."""
    target = Path(out_dir if out_dir is not None else params.out_dir)
    plan = plan_sample(params)
    base = begin(target)
    manifests = [generate_object(obj, params, base) for obj in plan.objects]
    rows = [p for shard in shards(plan) for p in generate_openimages_shard(shard, manifests, params, base)]
    for i in range(len(plan.dreambench)):
        generate_dreambench_subject(plan, i, params, base)
    finish(plan, params, base, rows)
    return publish(base, target)
