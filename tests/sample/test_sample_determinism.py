"""Same params, same bytes; output appears atomically; the plan is reproducible."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flows.sample import generate
from flows.sample.plan import FRAME_FAULTS, plan_sample


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_params_give_identical_bytes(small_sample, small_params, tmp_path):
    again = generate.generate_sample(small_params, tmp_path / "again")
    first, second = _tree(small_sample), _tree(again)
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []
    assert not any(name.startswith(generate.SCRATCH) for name in first)


def test_publish_replaces_previous_output_atomically(tmp_path):
    target = tmp_path / "sample"
    (target / "old").mkdir(parents=True)
    (target / "old" / "stale.txt").write_text("previous run")
    leftover = generate.staging_dir(target)
    (leftover / "junk").mkdir(parents=True)  # a killed run's staging folder
    staging = generate.begin(target)
    assert staging == leftover and list(staging.iterdir()) == []
    assert (target / "old" / "stale.txt").exists()  # untouched until the new output is complete
    (staging / "faults.json").write_text("[]")
    (staging / generate.SCRATCH).mkdir()
    generate.publish(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["faults.json"]
    assert not leftover.exists()


def test_plan_is_a_function_of_the_params(small_params):
    assert plan_sample(small_params) == plan_sample(small_params)
    other = plan_sample(dataclasses.replace(small_params, seed=small_params.seed + 1))
    assert other.objects[0].object_id != plan_sample(small_params).objects[0].object_id


def test_plan_ids_and_faults(small_params):
    plan = plan_sample(small_params)
    assert len({o.object_id for o in plan.objects}) == len(plan.objects)
    faulted = [(o.index, f) for o in plan.objects for f in o.frame_faults]
    assert sorted(name for _, (_, name) in faulted) == sorted(FRAME_FAULTS)
    few = [o for o in plan.objects if o.too_few_views]
    assert len(few) == 1 and few[0].n_views == 3 and not few[0].frame_faults
    images = plan.openimages.images
    assert len({i.image_id for i in images} | {plan.openimages.duplicate_id}) == len(images) + 1
    assert sum(len(i.boxes) for i in images) == small_params.n_openimages_boxes
    assert sum(i.empty_file for i in images) == 1


def test_no_faults_when_disabled(small_params):
    plan = plan_sample(dataclasses.replace(small_params, plant_faults=False))
    assert not any(o.frame_faults or o.too_few_views for o in plan.objects)
    assert plan.openimages.duplicate_id is None
    assert all(b.role == "clean" and not b.outside_root_row for i in plan.openimages.images for b in i.boxes)
    assert not any(i.empty_file for i in plan.openimages.images)


@pytest.mark.parametrize("changes", [dict(n_objects=1), dict(n_views=4), dict(n_openimages_boxes=3)])
def test_too_small_for_faults(small_params, changes):
    with pytest.raises(ValueError):
        plan_sample(dataclasses.replace(small_params, **changes))
