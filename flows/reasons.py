"""The closed vocabulary of reject reasons. Every rejects row carries one of these."""

from __future__ import annotations

# ingest: the input could not be read or does not belong to the data set
EMPTY_FILE = "empty_file"  # zero-byte image or mask file
UNREADABLE_IMAGE = "unreadable_image"  # truncated or corrupt image that fails to decode
MISSING_FILE = "missing_file"  # referenced by an annotation but absent on disk
PATH_OUTSIDE_ROOT = "path_outside_root"  # an annotation path that escapes its data root
BAD_ANNOTATION = "bad_annotation"  # a CSV row or COLMAP record that cannot be parsed
UNKNOWN_CLASS = "unknown_class"  # class id absent from the class-name table
UNREADABLE_MASK = "unreadable_mask"  # mask file that fails to decode
ORPHAN_MASK = "orphan_mask"  # segmentation row that matches no box
NOT_AN_IMAGE = "not_an_image"  # a file in an MVImgNet images/ folder without an image suffix

# filter: the input was read but fails a quality threshold in params.yaml (filter.*)
LOW_RESOLUTION = "low_resolution"
CLASS_DENIED = "class_denied"
CLASS_NOT_ALLOWED = "class_not_allowed"
GROUP_OF = "group_of"
DEPICTION = "depiction"
MISSING_MASK = "missing_mask"  # an MVImgNet frame without a mask in the mask tree
SUBJECT_TOO_SMALL = "subject_too_small"
SUBJECT_TOO_LARGE = "subject_too_large"
BOX_TOO_SMALL = "box_too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
MASK_FRAGMENTED = "mask_fragmented"
BLURRY = "blurry"
DUPLICATE = "duplicate"  # byte-identical to an earlier image of another subject
NEAR_DUPLICATE = "near_duplicate"  # perceptual hash within filter.near_duplicate_hamming
TOO_FEW_VIEWS = "too_few_views"

INGEST_REASONS = (
    EMPTY_FILE, UNREADABLE_IMAGE, MISSING_FILE, PATH_OUTSIDE_ROOT, BAD_ANNOTATION,
    UNKNOWN_CLASS, UNREADABLE_MASK, ORPHAN_MASK, NOT_AN_IMAGE,
)
FILTER_REASONS = (
    LOW_RESOLUTION, CLASS_DENIED, CLASS_NOT_ALLOWED, GROUP_OF, DEPICTION, MISSING_MASK,
    SUBJECT_TOO_SMALL, SUBJECT_TOO_LARGE, BOX_TOO_SMALL, BAD_ASPECT_RATIO, MASK_FRAGMENTED,
    BLURRY, DUPLICATE, NEAR_DUPLICATE, TOO_FEW_VIEWS,
)

# segment: the frame passed the filters but no subject mask could be made
EMPTY_MASK = "empty_mask"  # the provided mask or SAM's mask from the box has no subject pixel

SEGMENT_REASONS = (EMPTY_FILE, MISSING_FILE, UNREADABLE_IMAGE, UNREADABLE_MASK, BAD_ANNOTATION, EMPTY_MASK)

# pairs: the frame has a mask and an embedding but no positive, so it is no training reference
# (it stays in the embeddings and similarity tables, as a negative)
NO_POSITIVE = "no_positive"

PAIRS_REASONS = (NO_POSITIVE,)
