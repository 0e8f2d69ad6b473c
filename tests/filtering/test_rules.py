import dataclasses

import pytest

from flows import reasons
from flows.config.params import AreaRange, FilterParams
from flows.filtering.rules import RULES, first_failure

P = FilterParams()


def row(**over):
    base = {
        "frame_id": "mvimgnet:1/0000abcd/001.jpg", "source": "mvimgnet", "subject_id": "mvimgnet:1/0000abcd",
        "class_id": "1", "class_name": "bag", "image_path": "1/0000abcd/images/001.jpg",
        "width": 480, "height": 360, "box_xmin": 0.3, "box_ymin": 0.25, "box_xmax": 0.7, "box_ymax": 0.75,
        "mask_path": "1/0000abcd/001.jpg.png", "blur_score": 500.0, "subject_area_frac": 0.15,
        "mask_largest_cc_frac": 0.99, "is_group_of": None, "is_depiction": None,
    }
    base.update(over)
    return base


def test_clean_row_passes():
    assert first_failure(row(), P) is None


@pytest.mark.parametrize("over,params,reason", [
    ({"width": 100}, P, reasons.LOW_RESOLUTION),
    ({}, dataclasses.replace(P, class_deny=["bag"]), reasons.CLASS_DENIED),
    ({}, dataclasses.replace(P, class_allow=["cup"]), reasons.CLASS_NOT_ALLOWED),
    ({"source": "openimages", "is_group_of": True}, P, reasons.GROUP_OF),
    ({"source": "openimages", "is_depiction": True}, dataclasses.replace(P, exclude_depiction=True), reasons.DEPICTION),
    ({"mask_path": None, "mask_largest_cc_frac": None}, P, reasons.MISSING_MASK),
    ({"subject_area_frac": 0.005}, P, reasons.SUBJECT_TOO_SMALL),
    ({"subject_area_frac": 0.7}, P, reasons.SUBJECT_TOO_LARGE),
    ({"source": "openimages", "box_xmax": 0.45}, P, reasons.BOX_TOO_SMALL),
    ({"source": "openimages", "box_xmin": 0.05, "box_xmax": 0.95, "box_ymin": 0.4, "box_ymax": 0.8}, P,
     reasons.BAD_ASPECT_RATIO),
    ({"mask_largest_cc_frac": 0.5}, P, reasons.MASK_FRAGMENTED),
    ({"blur_score": 3.0}, P, reasons.BLURRY),
])
def test_each_rule_rejects_with_its_reason(over, params, reason):
    failure = first_failure(row(**over), params)
    assert failure is not None and failure[0] == reason
    assert "filter." in failure[1] or reason in (reasons.MISSING_MASK,)


def test_thresholds_are_per_source():
    # a 0.12 x 0.125 box on a 1000 x 1000 image (no other rule applies): box area 0.015
    small_box = {"width": 1000, "height": 1000, "box_xmin": 0.4, "box_xmax": 0.52, "box_ymin": 0.4, "box_ymax": 0.525}
    oi = row(source="openimages", mask_path=None, mask_largest_cc_frac=None, subject_area_frac=0.015, **small_box)
    assert first_failure(oi, P)[0] == reasons.SUBJECT_TOO_SMALL  # 0.015 < openimages min 0.02
    assert first_failure(row(subject_area_frac=0.015, **small_box), P) is None  # >= mvimgnet min 0.01
    custom = dataclasses.replace(P, openimages_area=AreaRange(min=0.01, max=0.9))
    assert first_failure(oi, custom) is None


def test_openimages_area_is_the_boxes_as_in_elite():
    # box 0.4 x 0.5 = 0.2 of the image, its mask only 0.015: ELITE's rule reads the box
    oi = row(source="openimages", mask_path="masks/x.png", subject_area_frac=0.015)
    assert first_failure(oi, P) is None
    failure = first_failure(row(source="openimages", box_xmin=0.0, box_xmax=1.0, box_ymin=0.05, box_ymax=0.95), P)
    assert failure[0] == reasons.SUBJECT_TOO_LARGE and failure[1].startswith("box covers 0.9000")


def test_first_failing_rule_wins():
    failure = first_failure(row(width=100, blur_score=1.0, subject_area_frac=0.0), P)
    assert failure[0] == reasons.LOW_RESOLUTION
    assert len(RULES) == len(set(RULES))


def test_rules_follow_their_source_precedent():
    # ELITE's box rules are OpenImages': a tall MVImgNet bottle (box 0.1 x 0.9) passes
    bottle = row(width=2000, height=1000, box_xmin=0.45, box_xmax=0.55, box_ymin=0.05, box_ymax=0.95)
    assert first_failure(bottle, P) is None
    assert first_failure({**bottle, "source": "openimages", "mask_path": None}, P)[0] == reasons.BAD_ASPECT_RATIO
    # AnyDoor's connectedness rule is MVImgNet's, and strict: more than 90% in one component
    assert first_failure(row(mask_largest_cc_frac=0.9), P)[0] == reasons.MASK_FRAGMENTED
    assert first_failure(row(mask_largest_cc_frac=0.91), P) is None
    assert first_failure(row(source="openimages", mask_largest_cc_frac=0.5), P) is None


def test_group_of_boxes_pass_when_not_excluded():
    group = row(source="openimages", is_group_of=True)
    assert first_failure(group, P)[0] == reasons.GROUP_OF
    assert first_failure(group, dataclasses.replace(P, exclude_group_of=False)) is None


def test_an_image_whose_sides_equal_min_image_side_passes():
    side = P.min_image_side
    assert first_failure(row(width=side, height=side), P) is None
    assert first_failure(row(width=side, height=side - 1), P)[0] == reasons.LOW_RESOLUTION


def test_a_subject_area_equal_to_the_maximum_passes():
    limit = P.mvimgnet_area.max
    assert first_failure(row(subject_area_frac=limit), P) is None
    assert first_failure(row(subject_area_frac=limit + 1e-6), P)[0] == reasons.SUBJECT_TOO_LARGE
