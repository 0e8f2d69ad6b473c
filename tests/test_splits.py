"""flows.splits: the seeded split of objects and photos, grouped by near-duplicate subjects."""

from __future__ import annotations

import dataclasses

from flows.config.params import ExportParams, FilterParams, Params, SimilarityParams
from flows.schemas import FRAMES, NEAR_DUPLICATES
from flows.splits import SplitRule, near_duplicate_groups, split_rule, unit_key
from flows.tables import write_table
from pipeline_tables import frame

SUBJECTS = {  # subject -> (source, photo)
    "mvimgnet:1/aaaaaaaa": ("mvimgnet", "1/aaaaaaaa/000.jpg"),
    "mvimgnet:1/bbbbbbbb": ("mvimgnet", "1/bbbbbbbb/000.jpg"),
    "mvimgnet:1/cccccccc": ("mvimgnet", "1/cccccccc/000.jpg"),
    "openimages:p1/box1": ("openimages", "train/p1.jpg"),
    "openimages:p1/box2": ("openimages", "train/p1.jpg"),  # a second box on the same photo
    "openimages:p2/box1": ("openimages", "train/p2.jpg"),
}


def write(tmp_path, pairs):
    write_table(tmp_path / "frames.parquet", FRAMES,
                [frame(f"{s}/f", s, source, path=path) for s, (source, path) in SUBJECTS.items()])
    write_table(tmp_path / "near_duplicates.parquet", NEAR_DUPLICATES,
                [{"subject_a": a, "subject_b": b, "r": 0.99} for a, b in pairs])
    return near_duplicate_groups(tmp_path / "near_duplicates.parquet", tmp_path / "frames.parquet")


def test_pairs_join_units_transitively_and_a_photos_boxes_are_one_unit(tmp_path):
    found = write(tmp_path, [("mvimgnet:1/aaaaaaaa", "openimages:p1/box1"),  # A ~ photo p1
                             ("openimages:p1/box2", "mvimgnet:1/bbbbbbbb"),  # p1 ~ B: so A, p1, B
                             ("openimages:p1/box1", "openimages:p1/box2"),  # one photo: no group of its own
                             ("mvimgnet:1/cccccccc", "mvimgnet:9/gone")])  # a subject no frame has
    assert found.groups == {"mvimgnet:1/aaaaaaaa": "mvimgnet:1/aaaaaaaa", "mvimgnet:1/bbbbbbbb": "mvimgnet:1/aaaaaaaa",
                            "openimages:train/p1.jpg": "mvimgnet:1/aaaaaaaa"}
    assert found.pairs == 4 and found.unknown == 1
    assert unit_key("openimages", "openimages:p1/box2", "train/p1.jpg") == "openimages:train/p1.jpg"


def test_a_group_lands_in_one_split_and_the_summary_counts_the_moves(tmp_path):
    found = write(tmp_path, [("mvimgnet:1/aaaaaaaa", "openimages:p2/box1")])
    units = ["mvimgnet:1/aaaaaaaa", "openimages:train/p2.jpg"]

    def apart(seed):
        plain = SplitRule(heldout_fraction=0.5, seed=seed)
        return plain.of_key(units[0]) != plain.of_key(units[1])

    seed = next(s for s in range(100) if apart(s))
    rule = SplitRule(heldout_fraction=0.5, seed=seed, groups=found.groups)
    assert rule.of("mvimgnet", units[0], "x.jpg") == rule.of("openimages", "openimages:p2/box1", "train/p2.jpg") \
        == rule.of_photo("train/p2.jpg") == rule.of_key(units[0])  # the group's key decides: the smallest unit
    summary = found.summary(rule)
    assert summary == {"pairs": 1, "groups": 1, "units": 2, "largest": 2, "units_moved": 1, "unknown_subjects": 0}
    assert rule.of_key("mvimgnet:1/cccccccc") == SplitRule(heldout_fraction=0.5, seed=seed).of_key("mvimgnet:1/cccccccc")


def test_split_rule_reads_the_similarity_and_filter_tables_the_params_name(tmp_path):
    found = write(tmp_path, [("mvimgnet:1/aaaaaaaa", "openimages:p2/box1")])
    params = Params(filter=FilterParams(out_dir=str(tmp_path)), similarity=SimilarityParams(out_dir=str(tmp_path)),
                    export=ExportParams(heldout_fraction=0.3, seed=4))
    assert split_rule(params) == SplitRule(heldout_fraction=0.3, seed=4, groups=found.groups) and found.groups
    off = dataclasses.replace(params, export=dataclasses.replace(params.export, group_near_duplicates=False))
    assert split_rule(off) == SplitRule(heldout_fraction=0.3, seed=4)
    assert hash(split_rule(params)) == hash(split_rule(off))  # hashable: the groups do not take part
