"""Every random choice of the sample, drawn up front from the global seed.

The plan is a pure function of :class:`SampleParams`: object shapes, colours, orbits, the
OpenImages layouts and which items carry a planted fault. Workers then only execute it, so the
output does not depend on task order or on how many workers ran. Each item draws from its own
generator, seeded by hashing (global seed, item key), so adding an object does not reshuffle
the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from flows.config.params import SampleParams
from flows.sample.photos import BACKGROUNDS, SCENE_BACKGROUNDS
from flows.sample.render import SHAPES, RenderSpec

# MVImgNet frame faults, one frame each; the object with too few views is separate
FRAME_FAULTS = ("truncated_jpeg", "blurred_frame", "missing_mask", "fragmented_mask")
FEW_VIEWS = 3  # frames of the too-few-views object

PALETTE = {  # distinct flat colours for untextured subjects (RGB, 0..1)
    "red": (0.85, 0.15, 0.12), "orange": (0.95, 0.55, 0.10), "yellow": (0.95, 0.85, 0.20),
    "green": (0.20, 0.70, 0.25), "teal": (0.10, 0.65, 0.65), "blue": (0.15, 0.35, 0.90),
    "purple": (0.55, 0.25, 0.80), "pink": (0.95, 0.45, 0.70), "white": (0.92, 0.92, 0.90),
    "brown": (0.55, 0.35, 0.20), "grey": (0.55, 0.57, 0.60), "lime": (0.60, 0.90, 0.20),
}
OI_SIZES = ((640, 480), (640, 427), (512, 512), (480, 640), (600, 450), (427, 640))


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for one item, stable across runs, platforms and Python versions."""
    text = "|".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def hex_id(seed: int, n_chars: int, *keys: object) -> str:
    """Lowercase hex id of ``n_chars`` characters (MVImgNet objects: 8, OpenImages images: 16)."""
    text = "|".join([str(seed), *map(str, keys)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n_chars]


@dataclass(frozen=True)
class ObjectPlan:
    """One MVImgNet object."""

    index: int  # position in the plan (0-based)
    class_id: str
    object_id: str  # 8 lowercase hex characters
    color_name: str  # PALETTE key (the texture may cover it)
    render: RenderSpec
    n_views: int  # frames written
    background: str  # scikit-image photo behind every frame
    camera_model: str  # "SIMPLE_PINHOLE" or "PINHOLE"
    seed: int  # the object's own seed (points3D sampling, observation noise)
    frame_faults: tuple[tuple[int, str], ...]  # (0-based frame index, FRAME_FAULTS name)
    too_few_views: bool  # the planted too-few-views object


@dataclass(frozen=True)
class BoxPlan:
    """One box slot of an OpenImages image."""

    slot: int  # layout cell
    role: str  # "clean", "tiny" (subject < 1% of the image) or "group_of" (several subjects)
    has_mask: bool  # a segmentation row and mask PNG exist
    outside_root_row: bool  # a segmentation row whose MaskPath escapes the data root


@dataclass(frozen=True)
class ImagePlan:
    """One OpenImages image."""

    index: int
    image_id: str  # 16 lowercase hex characters
    width: int
    height: int
    background: str
    boxes: tuple[BoxPlan, ...]
    empty_file: bool  # written as a zero-byte file
    seed: int


@dataclass(frozen=True)
class OpenImagesPlan:
    images: tuple[ImagePlan, ...]
    duplicate_source: str | None  # ImageID re-encoded as the near-duplicate
    duplicate_id: str | None  # its new ImageID (sorts after the source)


@dataclass(frozen=True)
class DreamBenchPlan:
    name: str  # subject folder name
    class_name: str
    render: RenderSpec
    background_seed: int


@dataclass(frozen=True)
class SamplePlan:
    objects: tuple[ObjectPlan, ...]
    openimages: OpenImagesPlan
    dreambench: tuple[DreamBenchPlan, ...]


def _render_spec(rng: np.random.Generator, kind_index: int, color: tuple[float, float, float]) -> RenderSpec:
    kind = SHAPES[kind_index]
    return RenderSpec(
        kind=kind.name,
        color=color,
        texture=kind.textures[int(rng.integers(len(kind.textures)))],
        scale=tuple(float(v) for v in rng.uniform(0.92, 1.08, size=3)),
        elevation_deg=float(kind.elevation_deg + rng.uniform(-4.0, 4.0)),
        azimuth0_deg=float(rng.uniform(0.0, 360.0)),
        view_angle_deg=float(rng.uniform(30.0, 38.0)),
        target_area=float(rng.uniform(0.14, 0.26)),
    )


def plan_objects(params: SampleParams) -> tuple[ObjectPlan, ...]:
    top = rng_for(params.seed, "objects")
    kinds = top.permutation(len(SHAPES))
    colors = top.permutation(len(PALETTE))
    backgrounds = top.permutation(len(SCENE_BACKGROUNDS))
    n = params.n_objects
    few = n - 1 if params.plant_faults else -1
    faults: dict[int, list[tuple[int, str]]] = {}
    if params.plant_faults:
        eligible = [int(i) for i in top.permutation(n - 1)]
        for k, fault in enumerate(FRAME_FAULTS):
            obj = eligible[k % len(eligible)]
            taken = {f for f, _ in faults.get(obj, [])}
            frame = next(int(f) for f in top.permutation(params.n_views) if int(f) not in taken)
            faults.setdefault(obj, []).append((frame, fault))
    objects, seen_ids = [], set()
    for i in range(n):
        rng = rng_for(params.seed, "object", i)
        kind = SHAPES[int(kinds[i % len(SHAPES)])]
        color_name = list(PALETTE)[int(colors[i % len(PALETTE)])]
        object_id = hex_id(params.seed, 8, "object", i)
        assert object_id not in seen_ids, "object id collision"
        seen_ids.add(object_id)
        objects.append(ObjectPlan(
            index=i, class_id=kind.class_id, object_id=object_id, color_name=color_name,
            render=_render_spec(rng, int(kinds[i % len(SHAPES)]), PALETTE[color_name]),
            n_views=FEW_VIEWS if i == few else params.n_views,
            background=SCENE_BACKGROUNDS[int(backgrounds[i % len(SCENE_BACKGROUNDS)])],
            camera_model="SIMPLE_PINHOLE" if i % 2 == 0 else "PINHOLE",
            seed=derive_seed(params.seed, "object-data", i),
            frame_faults=tuple(sorted(faults.get(i, []))),
            too_few_views=i == few,
        ))
    return tuple(objects)


def _boxes_per_image(rng: np.random.Generator, n_boxes: int, min_images: int) -> list[int]:
    counts: list[int] = []
    while sum(counts) < n_boxes:
        counts.append(int(min(rng.choice([1, 2, 2, 3, 3, 4]), n_boxes - sum(counts))))
    while len(counts) < min_images:  # split the largest image until there are enough
        big = int(np.argmax(counts))
        if counts[big] < 2:
            raise ValueError(f"n_openimages_boxes={n_boxes} is too small to plant every fault")
        counts[big] -= 1
        counts.append(1)
    return counts


def plan_openimages(params: SampleParams) -> OpenImagesPlan:
    """Images and their box slots. With faults planted, the tiny subject and the group-of box
    each get an image of their own, so that every faulted image path holds nothing but its fault;
    one image is written empty, one is copied as a near-duplicate and one clean box gets a
    second segmentation row whose MaskPath leaves the data root."""
    top = rng_for(params.seed, "openimages")
    if not params.plant_faults:
        counts = _boxes_per_image(top, params.n_openimages_boxes, 1)
    elif params.n_openimages_boxes < 4:
        raise ValueError(f"n_openimages_boxes={params.n_openimages_boxes} is too small to plant every fault")
    else:
        counts = _boxes_per_image(top, params.n_openimages_boxes - 2, 2) + [1, 1]
    roles = [["clean"] * c for c in counts]
    empty = dup = -1
    outside = (-1, -1)
    if params.plant_faults:
        roles[-2], roles[-1] = ["tiny"], ["group_of"]
        order = [int(i) for i in top.permutation(len(counts) - 2)]
        empty = min(order, key=lambda i: counts[i])  # fewest boxes lost to the empty file
        dup = next(i for i in order if i != empty)
        outside = next((i, 0) for i in order if i != empty)
    images = []
    for i, count in enumerate(counts):
        rng = rng_for(params.seed, "oi-image", i)
        width, height = OI_SIZES[int(rng.integers(len(OI_SIZES)))]
        boxes = []
        for s, role in enumerate(roles[i]):
            is_outside = (i, s) == outside
            has_mask = role == "tiny" or (role == "clean" and not is_outside and rng.random() < 0.75)
            boxes.append(BoxPlan(slot=s, role=role, has_mask=bool(has_mask), outside_root_row=is_outside))
        images.append(ImagePlan(
            index=i, image_id=hex_id(params.seed, 16, "oi-image", i), width=width, height=height,
            background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], boxes=tuple(boxes),
            empty_file=i == empty, seed=derive_seed(params.seed, "oi-data", i),
        ))
    dup_source = dup_id = None
    if dup >= 0:
        dup_source = images[dup].image_id
        taken = {img.image_id for img in images}
        dup_id = next(c for k in range(100_000)
                      if (c := hex_id(params.seed, 16, "oi-dup", k)) > dup_source and c not in taken)
    return OpenImagesPlan(images=tuple(images), duplicate_source=dup_source, duplicate_id=dup_id)


def plan_dreambench(params: SampleParams) -> tuple[DreamBenchPlan, ...]:
    top = rng_for(params.seed, "dreambench")
    kinds = top.permutation(len(SHAPES))
    colors = top.permutation(len(PALETTE))
    out = []
    for i in range(params.n_dreambench_subjects):
        rng = rng_for(params.seed, "dreambench-subject", i)
        kind_index = int(kinds[i % len(SHAPES)])
        color_name = list(PALETTE)[int(colors[i % len(PALETTE)])]
        spec = _render_spec(rng, kind_index, PALETTE[color_name])
        name = f"{color_name}_{SHAPES[kind_index].name}" + (f"{i // len(SHAPES) + 1}" if i >= len(SHAPES) else "")
        out.append(DreamBenchPlan(name=name, class_name=SHAPES[kind_index].class_name, render=spec,
                                  background_seed=derive_seed(params.seed, "dreambench-bg", i)))
    return tuple(out)


def plan_sample(params: SampleParams) -> SamplePlan:
    """The whole plan; raises ValueError where the sizes cannot hold every planted fault."""
    if params.plant_faults and (params.n_objects < 2 or params.n_views < FEW_VIEWS + 2):
        raise ValueError("plant_faults needs n_objects >= 2 and n_views >= 5")
    return SamplePlan(objects=plan_objects(params), openimages=plan_openimages(params),
                      dreambench=plan_dreambench(params))
