"""Parquet schemas of every table the pipeline writes, with one line of documentation per column.

Every writer and reader goes through these schemas (see :mod:`flows.tables`). A column's
documentation is stored in the Parquet field metadata under ``doc``.
"""

from __future__ import annotations

import pyarrow as pa


def _schema(name: str, columns: list[tuple[str, pa.DataType, bool, str]]) -> pa.Schema:
    fields = [
        pa.field(col, dtype, nullable=nullable, metadata={"doc": doc})
        for col, dtype, nullable, doc in columns
    ]
    return pa.schema(fields, metadata={"table": name})


FRAMES = _schema(
    "frames",
    [
        ("frame_id", pa.string(), False, "stable id: mvimgnet:<class>/<object>/<frame> or openimages:<ImageID>/<box key>"),
        ("source", pa.string(), False, "data set: mvimgnet or openimages"),
        ("subject_id", pa.string(), False, "the subject: an MVImgNet object, or the OpenImages box itself"),
        ("class_id", pa.string(), False, "class id as the data set writes it (MVImgNet number, OpenImages /m/ label)"),
        ("class_name", pa.string(), False, "human-readable class name from the data set's class table"),
        ("image_path", pa.string(), False, "image path relative to the source root (sources.*_root)"),
        ("width", pa.int32(), False, "image width in pixels, from the decoded image"),
        ("height", pa.int32(), False, "image height in pixels, from the decoded image"),
        ("frame_index", pa.int32(), True, "position of the frame in its object's sequence (MVImgNet), else null"),
        ("pose_qvec", pa.list_(pa.float64(), 4), True, "COLMAP world-to-camera rotation quaternion (w, x, y, z), null if no pose"),
        ("pose_tvec", pa.list_(pa.float64(), 3), True, "COLMAP world-to-camera translation, null if no pose"),
        ("box_xmin", pa.float32(), False, "subject box left edge, normalised to [0, 1]"),
        ("box_ymin", pa.float32(), False, "subject box top edge, normalised to [0, 1]"),
        ("box_xmax", pa.float32(), False, "subject box right edge, normalised to [0, 1]"),
        ("box_ymax", pa.float32(), False, "subject box bottom edge, normalised to [0, 1]"),
        ("mask_path", pa.string(), True, "mask path relative to the mask root (MVImgNet mask tree, OpenImages masks/), null if none"),
        ("content_hash", pa.string(), False, "sha256 of the image file bytes"),
        ("phash", pa.uint64(), False, "64-bit perceptual hash (DCT) of the whole image, for near-duplicates"),
        ("blur_score", pa.float32(), False, "variance of the Laplacian of the grayscale image at ingest.probe_side"),
        ("subject_area_frac", pa.float32(), False, "subject area / image area: from the mask when present, else the box"),
        ("mask_largest_cc_frac", pa.float32(), True, "share of mask pixels in the largest 8-connected component, null if no mask"),
        ("is_group_of", pa.bool_(), True, "OpenImages IsGroupOf flag, null for MVImgNet"),
        ("is_depiction", pa.bool_(), True, "OpenImages IsDepiction flag, null for MVImgNet"),
        ("is_occluded", pa.bool_(), True, "OpenImages IsOccluded flag, null for MVImgNet"),
        ("is_truncated", pa.bool_(), True, "OpenImages IsTruncated flag, null for MVImgNet"),
    ],
)

REJECTS = _schema(
    "rejects",
    [
        ("item_id", pa.string(), False, "frame_id where one could be formed, else the source and path of the input"),
        ("source", pa.string(), False, "data set: mvimgnet or openimages"),
        ("item_kind", pa.string(), False, "frame (counts toward the source's frames) or annotation (a mask row, a pose file)"),
        ("path", pa.string(), True, "offending file or annotation path relative to the source root"),
        ("stage", pa.string(), False, "the stage that rejected it: ingest, filter, segment, embed or pairs"),
        ("reason", pa.string(), False, "one reason from flows/reasons.py"),
        ("detail", pa.string(), False, "human-readable detail: the measured value against its threshold, the error text"),
    ],
)

MASKS = _schema(
    "masks",
    [
        ("frame_id", pa.string(), False, "the frame (flows.schemas.FRAMES.frame_id) this mask belongs to"),
        ("subject_id", pa.string(), False, "the frame's subject"),
        ("width", pa.int32(), False, "mask (= image) width in pixels"),
        ("height", pa.int32(), False, "mask (= image) height in pixels"),
        ("rle_counts", pa.binary(), False, "COCO compressed RLE counts (pycocotools), column-major, at image size"),
        ("bbox_x", pa.float32(), False, "mask bounding box left, pixels (COCO bbox x)"),
        ("bbox_y", pa.float32(), False, "mask bounding box top, pixels (COCO bbox y)"),
        ("bbox_w", pa.float32(), False, "mask bounding box width, pixels"),
        ("bbox_h", pa.float32(), False, "mask bounding box height, pixels"),
        ("area_frac", pa.float32(), False, "mask pixels / image pixels"),
        ("quality", pa.float32(), False, "1.0 for a data set's own mask; SAM's stability score for SAM masks"),
        ("method", pa.string(), False, "provided (the data set's mask), sam_box (SAM from the box), sam_refined"),
        ("model_id", pa.string(), True, "SAM model id (type and checkpoint) when SAM made or refined the mask"),
    ],
)


def embeddings_schema(dim: int) -> pa.Schema:
    """CLIP appearance embeddings of segmented subjects; ``dim`` is the model's output width."""
    return _schema(
        "embeddings",
        [
            ("frame_id", pa.string(), False, "the frame whose segmented subject was embedded"),
            ("subject_id", pa.string(), False, "the frame's subject"),
            ("embedding", pa.list_(pa.float16(), dim), False, "L2-normalised image embedding, float16"),
            ("model_id", pa.string(), False, "open_clip model name and pretrained tag (or checkpoint path)"),
        ],
    )


PAIRS = _schema(
    "pairs",
    [
        ("pair_id", pa.string(), False, "stable id: <frame_id>-><positive frame_id or aug:<n>>"),
        ("source", pa.string(), False, "data set of the pair"),
        ("subject_id", pa.string(), False, "the subject both sides show"),
        ("frame_id", pa.string(), False, "the reference frame"),
        ("kind", pa.string(), False, "multiview (another frame of the object) or augmentation (a recipe)"),
        ("positive_frame_id", pa.string(), True, "the positive frame for multiview pairs, else null"),
        ("angle_deg", pa.float32(), True, "angle between the two viewing directions (COLMAP poses), null if unknown"),
        ("frame_gap", pa.int32(), True, "difference of frame indices (multiview), null for augmentations"),
        ("area_ratio", pa.float32(), False, "positive / reference subject area in pixels (augmentations: scale squared)"),
        ("r_ij", pa.float32(), False, "cosine of the two segmented-subject embeddings (MACL's r_ij)"),
        ("aug_crop", pa.list_(pa.float32(), 4), True, "augmentation crop box (x0, y0, x1, y1) normalised, null for multiview"),
        ("aug_scale", pa.float32(), True, "augmentation subject scale factor"),
        ("aug_flip", pa.bool_(), True, "augmentation horizontal flip"),
        ("aug_background", pa.string(), True, "augmentation background id (a photo name), null to keep the original"),
        ("aug_seed", pa.int64(), True, "seed that makes the recipe reproducible"),
    ],
)

NEIGHBOURS = _schema(
    "neighbours",
    [
        ("level", pa.string(), False, "frame or subject"),
        ("i", pa.string(), False, "query frame_id or subject_id"),
        ("j", pa.string(), False, "neighbour frame_id or subject_id"),
        ("rank", pa.int16(), False, "0 = most similar neighbour of i"),
        ("r", pa.float32(), False, "cosine similarity of the embeddings (subjects: of their mean embeddings)"),
        ("near_duplicate", pa.bool_(), False, "different subjects with r >= similarity.near_duplicate_r"),
    ],
)

HARD_NEGATIVES = _schema(
    "hard_negatives",
    [
        ("subject_id", pa.string(), False, "the subject"),
        ("negative_subject_id", pa.string(), False, "a similar other subject that is not a near-duplicate of it"),
        ("rank", pa.int16(), False, "0 = the hardest negative"),
        ("r", pa.float32(), False, "cosine of the two subjects' mean embeddings"),
    ],
)

NEAR_DUPLICATES = _schema(
    "near_duplicates",
    [
        ("subject_a", pa.string(), False, "one subject of the pair (the smaller id)"),
        ("subject_b", pa.string(), False, "the other subject"),
        ("r", pa.float32(), False, "highest cosine seen between them (frames or subject means)"),
    ],
)

EXPORT = _schema(
    "export",
    [
        ("sample_id", pa.string(), False, "the pair this training sample comes from (PAIRS.pair_id)"),
        ("split", pa.string(), False, "train or heldout; by MVImgNet object and by OpenImages photo (flows/splits.py), so neither is in both"),
        ("source", pa.string(), False, "data set of the sample"),
        ("subject_id", pa.string(), False, "the subject"),
        ("frame_id", pa.string(), False, "the reference frame"),
        ("image_jpeg", pa.binary(), False, "reference image, JPEG, shorter side export.image_side"),
        ("width", pa.int32(), False, "width of image_jpeg in pixels"),
        ("height", pa.int32(), False, "height of image_jpeg in pixels"),
        ("mask_rle", pa.binary(), False, "subject mask at image_jpeg size, COCO compressed RLE counts"),
        ("positive_frame_id", pa.string(), True, "multi-view positive: a frame_id found as frame_id in the same split"),
        ("aug_crop", pa.list_(pa.float32(), 4), True, "augmentation positive: crop box (see flows.pairs.augment.Recipe)"),
        ("aug_scale", pa.float32(), True, "augmentation positive: subject scale"),
        ("aug_flip", pa.bool_(), True, "augmentation positive: horizontal flip"),
        ("aug_background", pa.string(), True, "augmentation positive: background photo, a key of backgrounds.parquet"),
        ("aug_seed", pa.int64(), True, "augmentation positive: recipe seed"),
        ("caption", pa.string(), False, "caption holding the placeholder word, e.g. 'a photo of a sks cup'"),
        ("placeholder_index", pa.int16(), False, "column of the placeholder in the caption's CLIP token ids (0 = start token)"),
        ("class_name", pa.string(), False, "the subject's class name"),
        ("r_ij", pa.float32(), False, "appearance cosine of reference and positive (PAIRS.r_ij)"),
        ("embedding_id", pa.string(), False, "row of the embeddings table for the reference (its frame_id)"),
        ("positive_embedding_id", pa.string(), False, "row of the embeddings table for the positive"),
    ],
)

BACKGROUNDS = _schema(
    "backgrounds",
    [
        ("image_path", pa.string(), False, "the photo's image_path (the key augmentation recipes use)"),
        ("image_jpeg", pa.binary(), False, "the photo, JPEG, shorter side export.image_side"),
    ],
)

EVALUATION = _schema(
    "evaluation",
    [
        ("subject", pa.string(), False, "DreamBench subject (its folder name)"),
        ("class_name", pa.string(), False, "the subject's class word"),
        ("kind", pa.string(), False, "reconstruction (the training caption) or editing (a DreamBench prompt)"),
        ("category", pa.string(), False, "reconstruction, or the editing prompt's: scene, accessorisation, style, shape"),
        ("prompt", pa.string(), False, "the prompt as generated from, with the placeholder word"),
        ("sample", pa.int32(), False, "index of the image among those of this subject and prompt"),
        ("seed", pa.int64(), False, "seed of the image's initial latents"),
        ("clip_t", pa.float32(), False, "CLIP cosine of the image and the prompt without the placeholder word"),
        ("clip_i", pa.float32(), False, "CLIP cosine of the (segmented) subject and the subject's photos, mean over photos"),
        ("dino_i", pa.float32(), False, "DINO cosine of the (segmented) subject and the subject's photos, mean over photos"),
        ("image_jpeg", pa.binary(), False, "the generated image, JPEG"),
    ],
)

ALL_TABLES = {"frames": FRAMES, "rejects": REJECTS, "masks": MASKS, "pairs": PAIRS, "neighbours": NEIGHBOURS,
              "hard_negatives": HARD_NEGATIVES, "near_duplicates": NEAR_DUPLICATES,
              "export": EXPORT, "backgrounds": BACKGROUNDS, "evaluation": EVALUATION}


def column_docs(schema: pa.Schema) -> dict[str, str]:
    """Column name -> its one-line documentation."""
    return {f.name: f.metadata[b"doc"].decode() for f in schema}
