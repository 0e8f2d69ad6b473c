"""COLMAP binary model: byte layout, round trips, pose geometry and malformed files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from flows.readers.colmap import (
    CAMERA_MODELS,
    Camera,
    ColmapFormatError,
    ImagePose,
    Point3D,
    angle_between_views,
    camera_center,
    qvec_to_rotmat,
    read_cameras_binary,
    read_images_binary,
    read_model,
    read_points3D_binary,
    rotmat_to_qvec,
    viewing_direction,
    write_model,
)


def _look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera R (3, 3) of a camera at `center` looking at `target`, world +z up."""
    forward = (target - center) / np.linalg.norm(target - center)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])  # rows: camera x, y, z in world coordinates


def _orbit(n: int, radius: float = 4.0, elevation_deg: float = 0.0) -> tuple[list[ImagePose], list[np.ndarray]]:
    poses, centers = [], []
    el = np.radians(elevation_deg)
    for i in range(n):
        az = 2 * np.pi * i / n
        c = radius * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        r = _look_at(c, np.zeros(3))
        xys = np.array([[10.5 * i, 20.25], [30.0, 40.0 + i]])
        ids = np.array([i, -1], dtype=np.int64)
        poses.append(ImagePose(i + 1, rotmat_to_qvec(r), tuple(-r @ c), 1 + i % 2, f"{i + 1:03d}.jpg", xys, ids))
        centers.append(c)
    return poses, centers


def _model(tmp_path):
    cams = [Camera(1, "SIMPLE_PINHOLE", 480, 360, (400.0, 240.0, 180.0)),
            Camera(2, "OPENCV", 640, 480, (500.0, 501.0, 320.0, 240.0, 0.1, -0.01, 0.001, 0.002))]
    poses, centers = _orbit(8)
    points = [Point3D(7, (0.1, 0.2, 0.3), (255, 0, 12), 0.5, np.array([1, 2]), np.array([0, 0])),
              Point3D(3, (1.0, -2.0, 3.0), (1, 2, 3), 1.25)]
    write_model(tmp_path, cams, poses, points)
    return cams, poses, centers, points


def test_round_trip_preserves_every_field(tmp_path):
    cams, poses, _, points = _model(tmp_path)
    rcams, rposes, rpoints = read_model(tmp_path)
    assert rcams == {c.id: c for c in cams}
    assert list(rposes) == [p.id for p in poses]
    for p in poses:
        q = rposes[p.id]
        assert (q.qvec, q.tvec, q.camera_id, q.name) == (p.qvec, p.tvec, p.camera_id, p.name)
        np.testing.assert_array_equal(q.xys, p.xys)
        np.testing.assert_array_equal(q.point3D_ids, p.point3D_ids)
    assert sorted(rpoints) == [3, 7]
    assert rpoints[7].rgb == (255, 0, 12) and rpoints[7].error == 0.5
    np.testing.assert_array_equal(rpoints[7].image_ids, [1, 2])
    assert len(rpoints[3].image_ids) == 0


def test_byte_layout_matches_colmap(tmp_path):
    _model(tmp_path)
    data = (tmp_path / "cameras.bin").read_bytes()
    expected = struct.pack("<Q", 2) + struct.pack("<iiQQ3d", 1, 0, 480, 360, 400.0, 240.0, 180.0)
    assert data.startswith(expected)
    assert len(data) == 8 + (24 + 3 * 8) + (24 + 8 * 8)
    images = (tmp_path / "images.bin").read_bytes()
    # first record: id, qvec, tvec, camera id, "001.jpg\0", 2 points of (x, y, id)
    assert struct.unpack_from("<i", images, 8) == (1,)
    assert images[8 + 64:8 + 64 + 8] == b"001.jpg\x00"
    assert struct.unpack_from("<Q", images, 8 + 64 + 8) == (2,)
    assert struct.unpack_from("<ddq", images, 8 + 64 + 16) == (0.0, 20.25, 0)


def test_orbit_geometry(tmp_path):
    _, _, centers, _ = _model(tmp_path)
    poses = read_images_binary(tmp_path / "images.bin")
    first = poses[1]
    for k, pose in poses.items():
        np.testing.assert_allclose(camera_center(pose), centers[k - 1], atol=1e-9)
        # the optical axis points from the camera centre to the orbit centre
        np.testing.assert_allclose(viewing_direction(pose), -centers[k - 1] / 4.0, atol=1e-9)
        expected = 45.0 * (k - 1)
        expected = min(expected, 360.0 - expected)
        assert angle_between_views(first, pose) == pytest.approx(expected, abs=1e-6)


def test_elevated_orbit_angles():
    poses, _ = _orbit(12, elevation_deg=30.0)
    # two views 180 degrees apart in azimuth at elevation e look 180 - 2e degrees apart
    assert angle_between_views(poses[0], poses[6]) == pytest.approx(120.0, abs=1e-6)
    assert angle_between_views(poses[3], poses[3]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_quaternion_round_trip(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    r = qvec_to_rotmat(q)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(qvec_to_rotmat(rotmat_to_qvec(r)), r, atol=1e-12)
    back = np.array(rotmat_to_qvec(r))
    np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-12)


@pytest.mark.parametrize("r", [np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])])
def test_half_turns(r):
    np.testing.assert_allclose(qvec_to_rotmat(rotmat_to_qvec(r)), r, atol=1e-12)


def test_camera_model_table():
    counts = {m.name: m.num_params for m in CAMERA_MODELS}
    assert counts["SIMPLE_PINHOLE"] == 3 and counts["PINHOLE"] == 4 and counts["OPENCV"] == 8
    assert [m.model_id for m in CAMERA_MODELS] == list(range(len(CAMERA_MODELS)))
    with pytest.raises(ValueError):
        Camera(1, "PINHOLE", 10, 10, (1.0, 2.0, 3.0))


@pytest.mark.parametrize("name, reader", [
    ("cameras.bin", read_cameras_binary),
    ("images.bin", read_images_binary),
    ("points3D.bin", read_points3D_binary),
])
def test_truncated_file(tmp_path, name, reader):
    _model(tmp_path)
    path = tmp_path / name
    data = path.read_bytes()
    for cut in (0, 4, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ColmapFormatError, match=name) as info:
            reader(path)
        assert "truncated" in str(info.value) or "declares" in str(info.value) or "NUL" in str(info.value)


def test_trailing_bytes(tmp_path):
    _model(tmp_path)
    path = tmp_path / "points3D.bin"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ColmapFormatError, match="trailing"):
        read_points3D_binary(path)


def test_unknown_camera_model(tmp_path):
    path = tmp_path / "cameras.bin"
    path.write_bytes(struct.pack("<Q", 1) + struct.pack("<iiQQ", 1, 99, 10, 10) + b"\x00" * 64)
    with pytest.raises(ColmapFormatError, match="unknown camera model id 99"):
        read_cameras_binary(path)


def test_duplicate_ids(tmp_path):
    rec = struct.pack("<iiQQ3d", 5, 0, 10, 10, 1.0, 5.0, 5.0)
    path = tmp_path / "cameras.bin"
    path.write_bytes(struct.pack("<Q", 2) + rec + rec)
    with pytest.raises(ColmapFormatError, match="duplicate camera id 5"):
        read_cameras_binary(path)


def test_absurd_count_fails_fast(tmp_path):
    path = tmp_path / "images.bin"
    path.write_bytes(struct.pack("<Q", 2**62))
    with pytest.raises(ColmapFormatError, match="declares"):
        read_images_binary(path)


def test_missing_file(tmp_path):
    with pytest.raises(ColmapFormatError, match="not found"):
        read_cameras_binary(tmp_path / "cameras.bin")


def test_empty_model(tmp_path):
    write_model(tmp_path / "sparse" / "0", [], [], [])
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (tmp_path / "sparse" / "0" / name).read_bytes() == b"\x00" * 8
    assert read_model(tmp_path / "sparse" / "0") == ({}, {}, {})
