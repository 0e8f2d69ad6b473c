"""Per-frame quality rules: each looks at one frames row and names the first failure.

Rules run in a fixed order, so a frame that fails several is rejected for the first; the
order puts cheap, decisive facts (resolution, class) before measured ones (area, blur).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows import ids, reasons
from flows.config.params import FilterParams

Row = dict[str, Any]
Failure = tuple[str, str] | None  # (reason, detail)


def low_resolution(row: Row, p: FilterParams) -> Failure:
    side = min(row["width"], row["height"])
    if side < p.min_image_side:
        return reasons.LOW_RESOLUTION, f"shorter side {side} px < filter.min_image_side {p.min_image_side}"
    return None


def class_lists(row: Row, p: FilterParams) -> Failure:
    name = row["class_name"]
    if name in p.class_deny:
        return reasons.CLASS_DENIED, f"class {name!r} is in filter.class_deny"
    if p.class_allow and name not in p.class_allow:
        return reasons.CLASS_NOT_ALLOWED, f"class {name!r} is not in filter.class_allow"
    return None


def openimages_flags(row: Row, p: FilterParams) -> Failure:
    if p.exclude_group_of and row["is_group_of"]:
        return reasons.GROUP_OF, "IsGroupOf box (several objects) and filter.exclude_group_of is true"
    if p.exclude_depiction and row["is_depiction"]:
        return reasons.DEPICTION, "IsDepiction box and filter.exclude_depiction is true"
    return None


def missing_mask(row: Row, p: FilterParams) -> Failure:
    if row["source"] == ids.MVIMGNET and row["mask_path"] is None:
        return reasons.MISSING_MASK, "no mask for this frame in the MVImgNet mask tree"
    return None


def subject_area(row: Row, p: FilterParams) -> Failure:
    """MVImgNet: the mask's area (AnyDoor's 1%..64%). OpenImages: the box's area, as ELITE's
    2%..80% rule is on boxes; a mask is smaller than its box, so its area would reject more."""
    if row["source"] == ids.MVIMGNET:
        limits, area, what, where = p.mvimgnet_area, row["subject_area_frac"], "subject", "filter.mvimgnet_area"
    else:
        limits, what, where = p.openimages_area, "box", "filter.openimages_area"
        area = (row["box_xmax"] - row["box_xmin"]) * (row["box_ymax"] - row["box_ymin"])
    if area < limits.min:
        return reasons.SUBJECT_TOO_SMALL, f"{what} covers {area:.4f} of the image < {where}.min {limits.min}"
    if area > limits.max:
        return reasons.SUBJECT_TOO_LARGE, f"{what} covers {area:.4f} of the image > {where}.max {limits.max}"
    return None


def box_shape(row: Row, p: FilterParams) -> Failure:
    """ELITE's OpenImages box rules. MVImgNet's box is its mask's: its size is judged by the mask
    area, and an aspect rule would drop tall or flat objects (bottles, keyboards)."""
    if row["source"] != ids.OPENIMAGES:
        return None
    width = (row["box_xmax"] - row["box_xmin"]) * row["width"]
    height = (row["box_ymax"] - row["box_ymin"]) * row["height"]
    if min(width, height) < p.min_box_side:
        return reasons.BOX_TOO_SMALL, f"box {width:.0f}x{height:.0f} px, a side < filter.min_box_side {p.min_box_side}"
    aspect = width / height
    if not p.box_aspect_min <= aspect <= p.box_aspect_max:
        return reasons.BAD_ASPECT_RATIO, (
            f"box aspect {aspect:.2f} outside filter.box_aspect_min..max {p.box_aspect_min}..{p.box_aspect_max}")
    return None


def mask_connected(row: Row, p: FilterParams) -> Failure:
    """AnyDoor's MVImgNet rule: the largest component must hold more than min_largest_component of
    the mask. OpenImages masks may be split by occluders, and ELITE does not check them."""
    share = row["mask_largest_cc_frac"]
    if row["source"] == ids.MVIMGNET and share is not None and share <= p.min_largest_component:
        return reasons.MASK_FRAGMENTED, (
            f"largest component holds {share:.3f} of the mask, not more than filter.min_largest_component "
            f"{p.min_largest_component}")
    return None


def blur(row: Row, p: FilterParams) -> Failure:
    if row["blur_score"] < p.min_blur_score:
        return reasons.BLURRY, f"Laplacian variance {row['blur_score']:.1f} < filter.min_blur_score {p.min_blur_score}"
    return None


RULES: tuple[Callable[[Row, FilterParams], Failure], ...] = (
    low_resolution, class_lists, openimages_flags, missing_mask, subject_area, box_shape,
    mask_connected, blur,
)


def first_failure(row: Row, p: FilterParams) -> Failure:
    """The first rule that ``row`` fails, as (reason, detail), or None if it passes all."""
    for rule in RULES:
        failure = rule(row, p)
        if failure is not None:
            return failure
    return None
