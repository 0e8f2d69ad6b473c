"""Reading DreamBench's published layout (cc_model.dreambench)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cc_model.dreambench import DreamBenchError, category_of, read_dreambench

# The published file's shape, cut short (google/dreambooth dataset/prompts_and_classes.txt).
PROMPTS = """Classes

subject_name,class
backpack,backpack
cat2,cat
red_cartoon,cartoon

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token)
]
"""


def write_bench(root, prompts=PROMPTS, subjects=("backpack", "cat2", "red_cartoon")):
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(prompts)
    rng = np.random.default_rng(0)
    for name in subjects:
        folder = root / "dataset" / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
    return root


def test_subjects_prompts_and_categories(tmp_path):
    bench = read_dreambench(write_bench(tmp_path / "db"), live_classes=["cat", "dog"])
    assert [(s.name, s.class_name, s.live, len(s.images)) for s in bench.subjects] == [
        ("backpack", "backpack", False, 2), ("cat2", "cat", True, 2), ("red_cartoon", "cartoon", False, 2)]
    assert [(p.template, p.category) for p in bench.object_prompts] == [
        ("a {0} {1} in the jungle", "scene"), ("a red {0} {1}", "style"), ("a cube shaped {0} {1}", "shape")]
    assert [p.category for p in bench.prompts_for(bench.subjects[1])] == [
        "scene", "accessorisation", "accessorisation", "style"]
    assert bench.object_prompts[1].text("sks", "backpack") == "a red sks backpack"
    assert bench.object_prompts[1].text("", "backpack") == "a red backpack"  # CLIP-T's prompt


def test_the_sample_writes_what_the_reader_reads(tmp_path):
    from flows.sample.dreambench import prompts_and_classes

    bench = read_dreambench(write_bench(tmp_path / "db", prompts_and_classes([("backpack", "backpack")]),
                                        subjects=("backpack",)), live_classes=["dog"])
    assert len(bench.object_prompts) == len(bench.live_prompts) == 25
    assert {category_of(p.template) for p in bench.live_prompts} == {"scene", "accessorisation", "style", "shape"}


def test_layout_errors_name_the_file(tmp_path):
    with pytest.raises(DreamBenchError, match="prompts_and_classes.txt: no such file"):
        read_dreambench(tmp_path, live_classes=[])
    write_bench(tmp_path / "db", subjects=("backpack", "cat2"))  # red_cartoon has no folder
    with pytest.raises(DreamBenchError, match="subject 'red_cartoon' .* has no images"):
        read_dreambench(tmp_path / "db", live_classes=[])
    (tmp_path / "db" / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\nbackpack,backpack\n")
    with pytest.raises(DreamBenchError, match="no 'Object Prompts'"):
        read_dreambench(tmp_path / "db", live_classes=[])
