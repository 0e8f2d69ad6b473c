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
        ("stage", pa.string(), False, "the stage that rejected it: ingest or filter"),
        ("reason", pa.string(), False, "one reason from flows/reasons.py"),
        ("detail", pa.string(), False, "human-readable detail: the measured value against its threshold, the error text"),
    ],
)

ALL_TABLES = {"frames": FRAMES, "rejects": REJECTS}


def column_docs(schema: pa.Schema) -> dict[str, str]:
    """Column name -> its one-line documentation."""
    return {f.name: f.metadata[b"doc"].decode() for f in schema}
