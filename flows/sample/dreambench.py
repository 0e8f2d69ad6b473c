"""DreamBench layout for evaluation: ``dataset/<subject>/<NN>.jpg`` and ``prompts_and_classes.txt``.

The subjects are rendered here, separately from the MVImgNet objects (evaluation subjects never
appear in training data), each photographed from several views in front of different photos.
The prompts file follows google/dreambooth's dataset/prompts_and_classes.txt: a Classes
section of ``subject_name,class`` lines, then the object and live-subject prompt lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flows.sample import photos
from flows.sample.plan import DreamBenchPlan
from flows.sample.render import render_object

IMAGE_SIDE = 512  # DreamBench photos are square-ish; the sample's are 512 x 512

OBJECT_PROMPTS = (
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug", "a red {0} {1}",
    "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
)
LIVE_SUBJECT_PROMPTS = OBJECT_PROMPTS[:10] + (
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
) + OBJECT_PROMPTS[20:]


def _prompt_list(prompts: tuple[str, ...]) -> str:
    lines = [f"'{p}'.format(unique_token, class_token)" for p in prompts]
    return "prompt_list = [\n" + ",\n".join(lines) + "\n]\n"


def prompts_and_classes(subjects: list[tuple[str, str]]) -> str:
    """The text of prompts_and_classes.txt for (subject_name, class) pairs."""
    classes = "".join(f"{name},{cls}\n" for name, cls in subjects)
    return ("Classes\n\nsubject_name,class\n" + classes + "\nPrompts\n\nObject Prompts\n\n"
            + _prompt_list(OBJECT_PROMPTS) + "\nLive Subject Prompts\n\n" + _prompt_list(LIVE_SUBJECT_PROMPTS))


def write_subject(subject: DreamBenchPlan, n_images: int, db_root: Path) -> Path:
    """Render one subject and write its reference photos; return its folder."""
    frames = render_object(subject.render, n_images, IMAGE_SIDE, IMAGE_SIDE).frames
    rng = np.random.default_rng(subject.background_seed)
    folder = db_root / "dataset" / subject.name
    for i, rgba in enumerate(frames):
        ys, xs = np.nonzero(rgba[..., 3] >= 128)
        crop = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        side = rng.uniform(0.45, 0.75) * IMAGE_SIDE / max(crop.shape[:2])
        w, h = max(1, round(crop.shape[1] * side)), max(1, round(crop.shape[0] * side))
        layer = photos.resize_premultiplied(crop, w, h)
        bg = photos.cover_crop(photos.BACKGROUNDS[int(rng.integers(len(photos.BACKGROUNDS)))],
                               IMAGE_SIDE, IMAGE_SIDE, rng, zoom=float(rng.uniform(1.0, 1.5)))
        x = int(rng.integers(0, IMAGE_SIDE - w + 1))
        y = int(rng.integers(0, IMAGE_SIDE - h + 1))
        photos.write_jpeg(photos.over(bg, layer, x, y), folder / f"{i:02d}.jpg")
    return folder


def write_prompts(subjects: tuple[DreamBenchPlan, ...], db_root: Path) -> Path:
    path = db_root / "prompts_and_classes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prompts_and_classes([(s.name, s.class_name) for s in subjects]), encoding="utf-8")
    return path
