"""One MVImgNet object in the real layout: frames, masks in their own tree, COLMAP sparse model.

    <mv_root>/<class_id>/<object_id>/images/001.jpg ...
    <mv_root>/<class_id>/<object_id>/sparse/0/{cameras.bin,images.bin,points3D.bin}
    <mask_root>/<class_id>/<object_id>/001.jpg.png ...   8-bit grayscale, or (every other object) a cutout:
                                                      the frame's colours, the mask as alpha
    <mv_root>/mvimgnet_category.txt          lines "id,name", no header

The COLMAP model holds the true render poses and the pinhole intrinsics of the render, plus a
sparse point cloud sampled uniformly from the mesh surface (a point is observed in a frame when
its triangle faces the camera and it projects inside the subject mask; occlusion by other parts
of a non-convex mesh is not modelled).
Subject cut-outs of every view are saved under the scratch folder for OpenImages to reuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flows.readers.colmap import Camera, ImagePose, Point3D, rotmat_to_qvec, write_model
from flows.sample import faults, photos
from flows.sample.plan import ObjectPlan
from flows.sample.render import SHAPE_BY_NAME, SHAPES, RenderResult, focal_length_px, project, render_object

MAX_POINTS3D = 300  # surface points sampled into points3D.bin (those seen twice are kept)
OBSERVATION_NOISE_PX = 0.3  # std of the 2D observations around the exact projection


def frame_name(index: int) -> str:
    """0-based view index -> MVImgNet frame file name ("001.jpg", ...)."""
    return f"{index + 1:03d}.jpg"


def intrinsics(model: str, width: int, height: int, view_angle_deg: float) -> tuple[float, ...]:
    f = focal_length_px(height, view_angle_deg)
    if model == "SIMPLE_PINHOLE":
        return (f, width / 2.0, height / 2.0)
    return (f, f, width / 2.0, height / 2.0)


def sample_surface(triangles: np.ndarray, normals: np.ndarray, n: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points spread uniformly over the surface (n, 3), with their triangles' normals (n, 3)."""
    edges1 = triangles[:, 1] - triangles[:, 0]  # (T, 3)
    edges2 = triangles[:, 2] - triangles[:, 0]
    areas = 0.5 * np.linalg.norm(np.cross(edges1, edges2), axis=1)  # (T,)
    tri = rng.choice(len(triangles), size=n, p=areas / areas.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0  # fold the unit square onto the triangle
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    pts = triangles[tri, 0] + u[:, None] * edges1[tri] + v[:, None] * edges2[tri]
    return pts, normals[tri]


def _points3d(obj: ObjectPlan, render: RenderResult, masks: list[np.ndarray], frames: list[np.ndarray],
              focal: float) -> tuple[list[Point3D], list[tuple[np.ndarray, np.ndarray]]]:
    """Sparse points with tracks, and per image the (xys (N, 2), point3D_ids (N,)) observations."""
    rng = np.random.default_rng(obj.seed)
    pts, nrm = sample_surface(render.triangles, render.normals, MAX_POINTS3D, rng)
    views = render.views
    h, w = masks[0].shape
    seen = np.zeros((len(views), len(pts)), dtype=bool)  # (V, P)
    uvs = []
    for v, view in enumerate(views):
        uv, z = project(pts, view, focal, w, h)
        uv = uv + rng.normal(0.0, OBSERVATION_NOISE_PX, size=uv.shape)
        col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        inside = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        facing = np.einsum("pd,pd->p", nrm, view.center - pts) > 0
        in_mask = np.zeros(len(pts), dtype=bool)
        in_mask[inside] = masks[v][row[inside], col[inside]]
        seen[v] = inside & facing & in_mask
        uvs.append(uv)
    keep = np.flatnonzero(seen.sum(axis=0) >= 2)  # COLMAP keeps points seen at least twice
    observations = []
    for v in range(len(views)):
        ids = keep[seen[v, keep]]
        observations.append((uvs[v][ids], ids.astype(np.int64) + 1))  # point ids start at 1
    points = []
    for p in keep:
        track_v = np.flatnonzero(seen[:, p])
        idx = [int(np.flatnonzero(observations[v][1] == p + 1)[0]) for v in track_v]
        first = observations[track_v[0]][0][idx[0]]
        rgb = frames[track_v[0]][min(int(first[1]), h - 1), min(int(first[0]), w - 1), :3]
        points.append(Point3D(int(p) + 1, tuple(float(c) for c in pts[p]), tuple(int(c) for c in rgb),
                              OBSERVATION_NOISE_PX * np.sqrt(np.pi / 2.0),  # mean norm of 2D noise
                              image_ids=track_v + 1, point2D_idxs=np.array(idx)))
    return points, observations


def _cutout(rgba: np.ndarray) -> np.ndarray:
    """The render cropped to the subject's mask box (h, w, 4)."""
    ys, xs = np.nonzero(rgba[..., 3] >= 128)
    return rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _backdrops(obj: ObjectPlan, width: int, height: int) -> list[np.ndarray]:
    """One background (H, W, 3) per view: the photo loop pans with the azimuth, bobs up and down
    like a hand-held capture and is lit from a side that turns with the camera."""
    strip = photos.panorama(obj.background, round(1.3 * height), 4 * width, obj.n_views)
    bob = np.random.default_rng([obj.seed, 1]).uniform(0.0, 1.0, size=obj.n_views)
    out = []
    for v in range(obj.n_views):
        x0 = round(strip.shape[1] * v / obj.n_views)
        y0 = int(bob[v] * (strip.shape[0] - height))
        light = np.radians(obj.render.azimuth0_deg) + 2 * np.pi * v / obj.n_views
        out.append(photos.light_gradient(photos.crop_wrapped(strip, x0, width)[y0:y0 + height], light))
    return out


def _write_frame(rgb: np.ndarray, mask: np.ndarray, fault: str | None, image_path: Path, mask_path: Path,
                 *, cutout: bool) -> None:
    """Write one frame and its mask (a grayscale PNG, or a cutout with the mask as alpha), planting the frame's
    fault if it has one."""
    photos.write_jpeg(faults.blur(rgb) if fault == "blurred_frame" else rgb, image_path)
    if fault == "truncated_jpeg":
        faults.truncate(image_path)
    if fault == "fragmented_mask":
        mask = faults.fragment(mask)
    if fault == "missing_mask":
        return
    if cutout:
        photos.write_cutout_png(rgb, mask, mask_path)
    else:
        photos.write_mask_png(mask, mask_path)


def write_object(obj: ObjectPlan, width: int, height: int, mv_root: Path, mask_root: Path,
                 scratch: Path) -> Path:
    """Render and write one object; return the path of its cut-out manifest (JSON) in scratch."""
    render = render_object(obj.render, obj.n_views, width, height)
    obj_dir = mv_root / obj.class_id / obj.object_id
    frame_faults = dict(obj.frame_faults)
    masks, composites = [], []
    for v, (rgba, backdrop) in enumerate(zip(render.frames, _backdrops(obj, width, height))):
        masks.append(rgba[..., 3] >= 128)
        composites.append(photos.over(backdrop, rgba))
        name = frame_name(v)
        _write_frame(composites[-1], masks[-1], frame_faults.get(v), obj_dir / "images" / name,
                     mask_root / obj.class_id / obj.object_id / f"{name}.png", cutout=obj.index % 2 == 1)

    camera = Camera(1, obj.camera_model, width, height,
                    intrinsics(obj.camera_model, width, height, obj.render.view_angle_deg))
    focal = focal_length_px(height, obj.render.view_angle_deg)
    points, observations = _points3d(obj, render, masks, composites, focal)
    images = [
        ImagePose(v + 1, rotmat_to_qvec(view.rotation), tuple(float(x) for x in view.translation), 1,
                  frame_name(v), xys=observations[v][0], point3D_ids=observations[v][1])
        for v, view in enumerate(render.views)
    ]
    write_model(obj_dir / "sparse" / "0", [camera], images, points)
    return _write_cutouts(obj, render.frames, scratch)


def _write_cutouts(obj: ObjectPlan, frames_rgba: list[np.ndarray], scratch: Path) -> Path:
    kind = SHAPE_BY_NAME[obj.render.kind]
    entries = []
    for v, rgba in enumerate(frames_rgba):
        crop = _cutout(rgba)
        path = scratch / "cutouts" / f"{obj.index:04d}" / f"{v:03d}.png"
        photos.write_rgba_png(crop, path)
        fill = float((crop[..., 3] >= 128).mean())
        entries.append({"path": str(path), "width": crop.shape[1], "height": crop.shape[0], "fill": fill})
    manifest = scratch / "cutouts" / f"{obj.index:04d}.json"
    manifest.write_text(json.dumps({"object_index": obj.index, "kind": kind.name, "oi_name": kind.oi_name,
                                    "views": entries}, indent=1, sort_keys=True))
    return manifest


def write_categories(mv_root: Path) -> Path:
    """mvimgnet_category.txt: every class of the shape catalogue, ``id,name`` by numeric id."""
    path = mv_root / "mvimgnet_category.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted({(int(s.class_id), s.class_name) for s in SHAPES})
    path.write_text("".join(f"{cid},{name}\n" for cid, name in rows), encoding="utf-8")
    return path
