"""COLMAP's binary sparse model (cameras.bin, images.bin, points3D.bin), read and written.

The byte layout is the one COLMAP writes (little endian, no padding; see COLMAP's
``src/colmap/scene/reconstruction_io.cc`` and ``scripts/python/read_write_model.py``):

cameras.bin   uint64 count; per camera: int32 camera_id, int32 model_id, uint64 width,
              uint64 height, float64 params[num_params(model)]
images.bin    uint64 count; per image: int32 image_id, float64 qvec[4] (w, x, y, z),
              float64 tvec[3], int32 camera_id, name (UTF-8, NUL-terminated),
              uint64 num_points2D, then per point (float64 x, float64 y, int64 point3D_id)
points3D.bin  uint64 count; per point: uint64 point3D_id, float64 xyz[3], uint8 rgb[3],
              float64 error, uint64 track_length, then per element (int32 image_id,
              int32 point2D_idx)

Poses are COLMAP's: (qvec, tvec) map world to camera, x_cam = R(qvec) x_world + tvec, with the
camera looking down its +z axis, +x right and +y down in the image. Each file is read with one
``read_bytes`` and parsed from memory; anything malformed raises :class:`ColmapFormatError`
naming the file and the offending record, never a bare ``struct.error``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ColmapFormatError(ValueError):
    """A COLMAP binary file that is truncated, malformed or uses an unknown camera model."""


@dataclass(frozen=True)
class CameraModel:
    """One entry of COLMAP's camera-model table."""

    model_id: int  # the int32 written in cameras.bin
    name: str  # COLMAP's name, e.g. "PINHOLE"
    num_params: int  # float64 parameters that follow width and height


CAMERA_MODELS: tuple[CameraModel, ...] = (
    CameraModel(0, "SIMPLE_PINHOLE", 3),  # f, cx, cy
    CameraModel(1, "PINHOLE", 4),  # fx, fy, cx, cy
    CameraModel(2, "SIMPLE_RADIAL", 4),  # f, cx, cy, k
    CameraModel(3, "RADIAL", 5),  # f, cx, cy, k1, k2
    CameraModel(4, "OPENCV", 8),  # fx, fy, cx, cy, k1, k2, p1, p2
    CameraModel(5, "OPENCV_FISHEYE", 8),  # fx, fy, cx, cy, k1, k2, k3, k4
    CameraModel(6, "FULL_OPENCV", 12),  # fx, fy, cx, cy, k1, k2, p1, p2, k3, k4, k5, k6
    CameraModel(7, "FOV", 5),  # fx, fy, cx, cy, omega
    CameraModel(8, "SIMPLE_RADIAL_FISHEYE", 4),  # f, cx, cy, k
    CameraModel(9, "RADIAL_FISHEYE", 5),  # f, cx, cy, k1, k2
    CameraModel(10, "THIN_PRISM_FISHEYE", 12),  # fx, fy, cx, cy, k1, k2, p1, p2, k3, k4, sx1, sy1
)
CAMERA_MODEL_BY_ID = {m.model_id: m for m in CAMERA_MODELS}
CAMERA_MODEL_BY_NAME = {m.name: m for m in CAMERA_MODELS}


@dataclass(frozen=True)
class Camera:
    """One intrinsic calibration (a row of cameras.bin)."""

    id: int
    model: str  # a name from CAMERA_MODELS
    width: int  # pixels
    height: int  # pixels
    params: tuple[float, ...]  # in COLMAP's order for the model

    def __post_init__(self) -> None:
        spec = CAMERA_MODEL_BY_NAME.get(self.model)
        if spec is None:
            raise ValueError(f"unknown COLMAP camera model {self.model!r}")
        if len(self.params) != spec.num_params:
            raise ValueError(f"{self.model} takes {spec.num_params} params, got {len(self.params)}")

    def calibration_matrix(self) -> np.ndarray:
        """K (3, 3) of the pinhole part (distortion ignored)."""
        p = self.params
        if self.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"):
            fx = fy = p[0]
            cx, cy = p[1], p[2]
        else:
            fx, fy, cx, cy = p[:4]
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _no_xys() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.float64)


def _no_ids() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


@dataclass(frozen=True)
class ImagePose:
    """One registered image (a record of images.bin): world-to-camera pose and 2D points."""

    id: int
    qvec: tuple[float, float, float, float]  # (w, x, y, z), unit quaternion of R
    tvec: tuple[float, float, float]  # x_cam = R x_world + t
    camera_id: int
    name: str  # image path relative to the image folder, e.g. "001.jpg"
    xys: np.ndarray = field(default_factory=_no_xys, compare=False, repr=False)  # (N, 2) pixels
    point3D_ids: np.ndarray = field(default_factory=_no_ids, compare=False, repr=False)  # (N,) -1 = none

    @property
    def rotation(self) -> np.ndarray:
        """R (3, 3), world to camera."""
        return qvec_to_rotmat(self.qvec)


@dataclass(frozen=True)
class Point3D:
    """One triangulated point (a record of points3D.bin)."""

    id: int
    xyz: tuple[float, float, float]
    rgb: tuple[int, int, int]
    error: float  # mean reprojection error in pixels
    image_ids: np.ndarray = field(default_factory=_no_ids, compare=False, repr=False)  # (L,) int32
    point2D_idxs: np.ndarray = field(default_factory=_no_ids, compare=False, repr=False)  # (L,) int32


# ---------------------------------------------------------------- rotations and view geometry


def qvec_to_rotmat(qvec: Iterable[float]) -> np.ndarray:
    """Rotation matrix (3, 3) of a quaternion (w, x, y, z); the quaternion is normalised first."""
    q = np.asarray(list(qvec), dtype=np.float64)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * y * y - 2 * z * z, 2 * x * y - 2 * w * z, 2 * z * x + 2 * w * y],
        [2 * x * y + 2 * w * z, 1 - 2 * x * x - 2 * z * z, 2 * y * z - 2 * w * x],
        [2 * z * x - 2 * w * y, 2 * y * z + 2 * w * x, 1 - 2 * x * x - 2 * y * y],
    ])


def rotmat_to_qvec(rotmat: np.ndarray) -> tuple[float, float, float, float]:
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix (3, 3).

    Shepperd's method: build from the largest of the four diagonal combinations, which keeps
    the division well conditioned for every rotation (180-degree turns included).
    """
    m = np.asarray(rotmat, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    cands = np.array([trace, m[0, 0], m[1, 1], m[2, 2]])
    k = int(np.argmax(cands))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    qa = np.array(q)
    qa /= np.linalg.norm(qa)
    if qa[0] < 0:
        qa = -qa
    return (float(qa[0]), float(qa[1]), float(qa[2]), float(qa[3]))


def camera_center(pose: ImagePose) -> np.ndarray:
    """Camera centre (3,) in world coordinates: C = -R^T t."""
    return -pose.rotation.T @ np.asarray(pose.tvec, dtype=np.float64)


def viewing_direction(pose: ImagePose) -> np.ndarray:
    """Unit optical axis (3,) in world coordinates: R^T [0, 0, 1]."""
    d = pose.rotation.T @ np.array([0.0, 0.0, 1.0])
    return d / np.linalg.norm(d)


def angle_between_views(a: ImagePose, b: ImagePose) -> float:
    """Angle in degrees between the optical axes of two images (0 = same direction)."""
    cos = float(np.dot(viewing_direction(a), viewing_direction(b)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


# ---------------------------------------------------------------- reading


class _Buffer:
    """A cursor over the bytes of one file; every short read becomes a ColmapFormatError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except FileNotFoundError:
            raise ColmapFormatError(f"{path}: file not found") from None
        self.pos = 0

    def error(self, what: str) -> ColmapFormatError:
        return ColmapFormatError(f"{self.path}: {what} (at byte {self.pos} of {len(self.data)})")

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise self.error(f"truncated while reading {what}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        size = dtype.itemsize * count
        if count < 0 or self.pos + size > len(self.data):
            raise self.error(f"truncated while reading {what} ({count} entries)")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += size
        return out

    def cstring(self, what: str) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self.error(f"{what} is not NUL-terminated")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not UTF-8") from None

    def count(self, min_record: int, what: str) -> int:
        (n,) = self.unpack("<Q", f"{what} count")
        if n * min_record > len(self.data) - self.pos:
            raise self.error(f"declares {n} {what} but only {len(self.data) - self.pos} bytes follow")
        return n

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise self.error(f"{len(self.data) - self.pos} trailing bytes after the last record")


_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
_TRACK = np.dtype([("image_id", "<i4"), ("point2D_idx", "<i4")])


def _check_unique(buf: _Buffer, seen: Mapping[int, object], record_id: int, what: str) -> None:
    if record_id in seen:
        raise buf.error(f"duplicate {what} id {record_id}")


def read_cameras_binary(path: str | Path) -> dict[int, Camera]:
    """cameras.bin -> {camera_id: Camera}."""
    buf = _Buffer(Path(path))
    cameras: dict[int, Camera] = {}
    for i in range(buf.count(24, "cameras")):
        camera_id, model_id, width, height = buf.unpack("<iiQQ", f"camera {i} header")
        spec = CAMERA_MODEL_BY_ID.get(model_id)
        if spec is None:
            raise buf.error(f"camera {camera_id} has unknown camera model id {model_id}")
        params = buf.unpack(f"<{spec.num_params}d", f"camera {camera_id} params")
        _check_unique(buf, cameras, camera_id, "camera")
        cameras[camera_id] = Camera(camera_id, spec.name, int(width), int(height), tuple(params))
    buf.finish()
    return cameras


def read_images_binary(path: str | Path) -> dict[int, ImagePose]:
    """images.bin -> {image_id: ImagePose}."""
    buf = _Buffer(Path(path))
    images: dict[int, ImagePose] = {}
    for i in range(buf.count(73, "images")):  # 64-byte header + NUL + uint64 point count
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = buf.unpack("<i7di", f"image {i} header")
        name = buf.cstring(f"name of image {image_id}")
        (n_points,) = buf.unpack("<Q", f"point count of image {image_id}")
        points = buf.array(_POINT2D, n_points, f"2D points of image {image_id}")
        _check_unique(buf, images, image_id, "image")
        images[image_id] = ImagePose(
            image_id, (qw, qx, qy, qz), (tx, ty, tz), camera_id, name,
            xys=np.stack([points["x"], points["y"]], axis=1),  # (N, 2)
            point3D_ids=points["id"].astype(np.int64),
        )
    buf.finish()
    return images


def read_points3D_binary(path: str | Path) -> dict[int, Point3D]:
    """points3D.bin -> {point3D_id: Point3D}."""
    buf = _Buffer(Path(path))
    points: dict[int, Point3D] = {}
    for i in range(buf.count(51, "points")):  # 43-byte record + uint64 track length
        point_id, x, y, z, r, g, b, error = buf.unpack("<Q3d3Bd", f"point {i}")
        (track_len,) = buf.unpack("<Q", f"track length of point {point_id}")
        track = buf.array(_TRACK, track_len, f"track of point {point_id}")
        _check_unique(buf, points, point_id, "point3D")
        points[point_id] = Point3D(
            point_id, (x, y, z), (r, g, b), error,
            image_ids=track["image_id"].astype(np.int64),
            point2D_idxs=track["point2D_idx"].astype(np.int64),
        )
    buf.finish()
    return points


def read_model(sparse_dir: str | Path) -> tuple[dict[int, Camera], dict[int, ImagePose], dict[int, Point3D]]:
    """Read ``cameras.bin``, ``images.bin`` and ``points3D.bin`` of one sparse model folder."""
    d = Path(sparse_dir)
    return (read_cameras_binary(d / "cameras.bin"), read_images_binary(d / "images.bin"),
            read_points3D_binary(d / "points3D.bin"))


# ---------------------------------------------------------------- writing


def _values(records: Mapping[int, object] | Iterable[object]) -> list:
    return sorted(records.values() if isinstance(records, Mapping) else records, key=lambda r: r.id)


def write_cameras_binary(cameras: Mapping[int, Camera] | Iterable[Camera], path: str | Path) -> None:
    """Write cameras.bin, records sorted by id (as COLMAP does)."""
    rows = _values(cameras)
    out = [struct.pack("<Q", len(rows))]
    for cam in rows:
        spec = CAMERA_MODEL_BY_NAME[cam.model]
        out.append(struct.pack("<iiQQ", cam.id, spec.model_id, cam.width, cam.height))
        out.append(struct.pack(f"<{spec.num_params}d", *cam.params))
    Path(path).write_bytes(b"".join(out))


def write_images_binary(images: Mapping[int, ImagePose] | Iterable[ImagePose], path: str | Path) -> None:
    """Write images.bin, records sorted by id."""
    rows = _values(images)
    out = [struct.pack("<Q", len(rows))]
    for img in rows:
        name = img.name.encode("utf-8")
        if b"\x00" in name:
            raise ValueError(f"image name {img.name!r} contains NUL")
        out.append(struct.pack("<i4d3di", img.id, *img.qvec, *img.tvec, img.camera_id))
        out.append(name + b"\x00")
        xys = np.asarray(img.xys, dtype=np.float64).reshape(-1, 2)  # (N, 2)
        ids = np.asarray(img.point3D_ids, dtype=np.int64).reshape(-1)  # (N,)
        if len(xys) != len(ids):
            raise ValueError(f"image {img.id}: {len(xys)} xys but {len(ids)} point3D ids")
        points = np.empty(len(ids), dtype=_POINT2D)
        points["x"], points["y"], points["id"] = xys[:, 0], xys[:, 1], ids
        out.append(struct.pack("<Q", len(ids)))
        out.append(points.tobytes())
    Path(path).write_bytes(b"".join(out))


def write_points3D_binary(points: Mapping[int, Point3D] | Iterable[Point3D], path: str | Path) -> None:
    """Write points3D.bin, records sorted by id."""
    rows = _values(points)
    out = [struct.pack("<Q", len(rows))]
    for pt in rows:
        image_ids = np.asarray(pt.image_ids).reshape(-1)
        idxs = np.asarray(pt.point2D_idxs).reshape(-1)
        if len(image_ids) != len(idxs):
            raise ValueError(f"point {pt.id}: track has {len(image_ids)} image ids but {len(idxs)} indices")
        track = np.empty(len(idxs), dtype=_TRACK)
        track["image_id"], track["point2D_idx"] = image_ids, idxs
        out.append(struct.pack("<Q3d3Bd", pt.id, *pt.xyz, *pt.rgb, pt.error))
        out.append(struct.pack("<Q", len(idxs)))
        out.append(track.tobytes())
    Path(path).write_bytes(b"".join(out))


def write_model(
    sparse_dir: str | Path,
    cameras: Mapping[int, Camera] | Iterable[Camera],
    images: Mapping[int, ImagePose] | Iterable[ImagePose],
    points: Mapping[int, Point3D] | Iterable[Point3D] = (),
) -> None:
    """Write the three files of one sparse model folder (created if missing)."""
    d = Path(sparse_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_cameras_binary(cameras, d / "cameras.bin")
    write_images_binary(images, d / "images.bin")
    write_points3D_binary(points, d / "points3D.bin")
