import numpy as np
import pytest

from flows.readers import colmap
from flows.readers import mvimgnet as mv


def test_categories(tmp_path):
    path = tmp_path / "mvimgnet_category.txt"
    path.write_bytes(b'0,bag\r\n1,"chair, wooden"\r\n\r\n7,toy car\n')
    assert mv.read_categories(path) == {"0": "bag", "1": "chair, wooden", "7": "toy car"}


def test_categories_bad_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("0,bag\njustaname\n")
    with pytest.raises(ValueError, match=":2: expected 'id,name'"):
        mv.read_categories(path)


def _pose(i: int, name: str) -> colmap.ImagePose:
    angle = np.deg2rad(30 * i)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    return colmap.ImagePose(id=i + 1, qvec=colmap.rotmat_to_qvec(rot), tvec=(0.0, 0.0, 3.0), camera_id=1, name=name)


def test_walk_and_poses(tmp_path):
    for cls, obj, frames in (("3", "0000abcd", ["002.jpg", "001.jpg", "notes.txt"]), ("10", "ffff0000", [])):
        images = tmp_path / cls / obj / "images"
        images.mkdir(parents=True)
        for f in frames:
            (images / f).write_bytes(b"x")
    (tmp_path / "3" / "stray_file").write_text("x")
    (tmp_path / "3" / "no_images_here").mkdir()
    sparse = tmp_path / "3" / "0000abcd" / "sparse" / "0"
    sparse.mkdir(parents=True)
    colmap.write_images_binary([_pose(0, "001.jpg"), _pose(1, "002.jpg")], sparse / "images.bin")
    objects = list(mv.iter_objects(tmp_path))
    assert [(o.class_id, o.object_id, o.frames) for o in objects] == [
        ("10", "ffff0000", ()), ("3", "0000abcd", ("001.jpg", "002.jpg"))]
    poses = mv.read_object_poses(tmp_path, "3", "0000abcd")
    assert sorted(poses) == ["001.jpg", "002.jpg"]
    assert colmap.angle_between_views(poses["001.jpg"], poses["002.jpg"]) == pytest.approx(30.0)
    assert mv.read_object_poses(tmp_path, "10", "ffff0000") == {}


def test_paths():
    assert mv.frame_relpath("3", "0000abcd", "001.jpg") == "3/0000abcd/images/001.jpg"
    assert mv.mask_relpath("3", "0000abcd", "001.jpg") == "3/0000abcd/001.jpg.png"
