"""Offscreen rendering of the sample's subjects: a shape catalogue, orbit cameras and RGBA renders.

Every mesh is centred on its bounding-box centre and scaled to a bounding sphere of radius 1,
so one camera model fits them all. Cameras sit on an orbit around the origin, world +z up, and
their poses are returned the way COLMAP stores them (world to camera, +x right, +y down, +z
forward), so the COLMAP files written from them are the true render poses.

VTK is not thread-safe: every call into it holds :data:`RENDER_LOCK`, so Prefect's thread pool
can run object tasks side by side and only the (short) GL part is serialised.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

RENDER_LOCK = threading.Lock()
EDGE_MARGIN = 6  # pixels kept free around every silhouette (no subject is cut by the frame)
_UP = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class ShapeKind:
    """One kind of subject; its class appears in MVImgNet and OpenImages under these names."""

    name: str  # key of the mesh builder
    class_id: str  # MVImgNet class id (a small integer as a string)
    class_name: str  # MVImgNet category name
    oi_name: str  # OpenImages DisplayName
    elevation_deg: float  # orbit elevation (before jitter); keeps the silhouette box within aspect 0.5..2
    textures: tuple[str | None, ...]  # texture choices (scikit-image photo names; None = flat colour)
    smooth: bool  # smooth (curved surfaces) or flat shading (hard edges)


# Shapes with rotational symmetry always carry a texture: a flat-coloured cone looks the same
# from every side, and its frames would be near-duplicates of each other.
SHAPES: tuple[ShapeKind, ...] = (
    # pyvista's airplane and ant are not used: their wings and legs are separate parts whose
    # silhouettes split into several components (a fragmented mask in every other view)
    ShapeKind("gem", "7", "gemstone", "Gemstone", 30.0, (None,), False),
    ShapeKind("nut", "23", "hex nut", "Nut, hardware", 35.0, ("colorwheel", "coffee"), False),
    ShapeKind("ball", "31", "ball", "Ball", 25.0, ("coffee", "colorwheel", "astronaut"), True),
    ShapeKind("globe", "35", "globe", "Globe", 20.0, ("earth",), True),
    ShapeKind("box", "40", "box", "Box", 30.0, ("brick", "chelsea", None), False),
    ShapeKind("cone", "44", "traffic cone", "Traffic cone", 20.0, ("colorwheel", "rocket", "astronaut"), True),
    ShapeKind("can", "52", "tin can", "Tin can", 25.0, ("rocket", "astronaut", "colorwheel"), True),
    ShapeKind("donut", "60", "doughnut", "Doughnut", 45.0, ("coffee", "colorwheel", "chelsea"), True),
    ShapeKind("cushion", "71", "cushion", "Pillow", 30.0, ("immunohistochemistry", "colorwheel"), True),
    ShapeKind("ring", "88", "ring", "Ring", 45.0, ("colorwheel", "astronaut"), True),
)
SHAPE_BY_NAME = {s.name: s for s in SHAPES}


@dataclass(frozen=True)
class RenderSpec:
    """Everything that decides one object's renders (all drawn from the object's seed)."""

    kind: str  # a ShapeKind name
    color: tuple[float, float, float]  # RGB in 0..1 (ignored where a texture is set)
    texture: str | None  # scikit-image photo name, "earth" for the globe map, or None
    scale: tuple[float, float, float]  # anisotropic stretch before normalising to radius 1
    elevation_deg: float  # orbit elevation of every view
    azimuth0_deg: float  # azimuth of the first view; the others follow evenly around 360 degrees
    view_angle_deg: float  # vertical field of view of the camera
    target_area: float  # wanted silhouette share of the frame (sets the orbit radius)


@dataclass(frozen=True)
class View:
    """One rendered camera: COLMAP pose and the camera centre it came from."""

    rotation: np.ndarray  # (3, 3) world to camera
    translation: np.ndarray  # (3,) x_cam = R x_world + t
    center: np.ndarray  # (3,) camera centre in world coordinates


def look_at(center: np.ndarray, target: np.ndarray = np.zeros(3)) -> np.ndarray:
    """World-to-camera rotation (3, 3) of a camera at ``center`` looking at ``target``, +z up.

    Rows are the camera axes in world coordinates: right (x), down (y), forward (z).
    """
    forward = np.asarray(target, float) - np.asarray(center, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, _UP)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def orbit_views(spec: RenderSpec, n_views: int, radius: float) -> list[View]:
    """``n_views`` cameras evenly spaced in azimuth on a circle of ``radius`` at the spec's elevation."""
    el = np.radians(spec.elevation_deg)
    views = []
    for i in range(n_views):
        az = np.radians(spec.azimuth0_deg + 360.0 * i / n_views)
        c = radius * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        r = look_at(c)
        views.append(View(rotation=r, translation=-r @ c, center=c))
    return views


def focal_length_px(height: int, view_angle_deg: float) -> float:
    """Pixel focal length of VTK's camera, whose view angle is the vertical field of view."""
    return (height / 2.0) / np.tan(np.radians(view_angle_deg) / 2.0)


def project(points: np.ndarray, view: View, focal: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) (COLMAP convention: pixel centres at +0.5) and depths (N,)."""
    cam = points @ view.rotation.T + view.translation  # (N, 3) camera coordinates
    z = cam[:, 2]
    uv = focal * cam[:, :2] / z[:, None] + np.array([width / 2.0, height / 2.0])
    return uv, z


def _texture(name: str):
    """A pv.Texture: pyvista's bundled earth map, or a shipped scikit-image photo."""
    import pyvista as pv
    from pyvista import examples

    if name == "earth":
        return examples.load_globe_texture()
    from flows.sample.photos import load_photo

    return pv.Texture(np.ascontiguousarray(load_photo(name)))


def build_mesh(spec: RenderSpec):
    """The spec's mesh, stretched, centred and scaled to a bounding sphere of radius 1."""
    import pyvista as pv
    from pyvista import examples

    builders = {
        "gem": lambda: pv.Dodecahedron(),
        "nut": examples.load_nut,
        "ball": lambda: examples.load_sphere(),
        "globe": examples.load_globe,
        "box": lambda: pv.Cube(x_length=1.0, y_length=0.8, z_length=0.7).triangulate().subdivide(2),
        "cone": lambda: pv.Cone(direction=(0, 0, 1), height=1.2, radius=0.55, resolution=64),
        "can": lambda: pv.Cylinder(direction=(0, 0, 1), radius=0.5, height=1.0, resolution=64),
        "donut": lambda: pv.ParametricTorus(ringradius=1.0, crosssectionradius=0.45),
        "cushion": lambda: pv.ParametricSuperEllipsoid(xradius=1.0, yradius=0.8, zradius=0.6,
                                                       n1=0.3, n2=0.3),
        "ring": lambda: pv.ParametricSuperToroid(n1=0.5, n2=2.0),
    }
    mesh = builders[spec.kind]().triangulate()
    pts = np.asarray(mesh.points, dtype=np.float64) * np.asarray(spec.scale)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts -= (lo + hi) / 2.0
    pts /= np.linalg.norm(pts, axis=1).max()
    mesh.points = pts
    if spec.texture and spec.kind != "globe":
        mesh.texture_map_to_sphere(inplace=True, prevent_seam=False)
    return mesh


def _render_rgba(plotter, view: View, focal_point=(0.0, 0.0, 0.0)) -> np.ndarray:
    plotter.camera_position = [tuple(view.center), focal_point, tuple(_UP)]
    plotter.reset_camera_clipping_range()
    plotter.render()
    return plotter.screenshot(transparent_background=True, return_img=True)  # (H, W, 4) uint8


def _silhouette_area(rgba: np.ndarray) -> float:
    return float((rgba[..., 3] >= 128).mean())


def _fit_radius(spec: RenderSpec, pts: np.ndarray, n_views: int, width: int, height: int,
                radius: float) -> float:
    """Grow ``radius`` until every vertex of every view projects at least EDGE_MARGIN inside the
    frame (the silhouette's box is the box of the projected vertices)."""
    focal = focal_length_px(height, spec.view_angle_deg)
    lo, hi = np.array([EDGE_MARGIN, EDGE_MARGIN]), np.array([width - EDGE_MARGIN, height - EDGE_MARGIN])
    for _ in range(100):
        uv = np.concatenate([project(pts, v, focal, width, height)[0] for v in orbit_views(spec, n_views, radius)])
        if (uv.min(axis=0) >= lo).all() and (uv.max(axis=0) <= hi).all():
            return float(radius)
        radius *= 1.05
    raise RuntimeError(f"no orbit radius keeps {spec.kind} inside the frame")


@dataclass(frozen=True)
class RenderResult:
    """One object's renders and the geometry behind them."""

    frames: list[np.ndarray]  # per view (H, W, 4) uint8, colour premultiplied by alpha
    views: list[View]
    radius: float  # orbit radius
    triangles: np.ndarray  # (T, 3, 3) mesh triangles (corners x xyz), world coordinates
    normals: np.ndarray  # (T, 3) outward unit triangle normals


def render_object(spec: RenderSpec, n_views: int, width: int, height: int) -> RenderResult:
    """Render ``n_views`` RGBA frames of one object around its orbit.

    The orbit radius is chosen from a probe render of the first view so that the silhouette
    covers about ``spec.target_area`` of the frame, then grown until no view touches the edge.
    Everything that touches VTK (mesh filters included) runs under :data:`RENDER_LOCK`.
    """
    import pyvista as pv

    with RENDER_LOCK:
        mesh = build_mesh(spec)
        oriented = mesh.compute_normals(point_normals=False, cell_normals=True, split_vertices=False,
                                        auto_orient_normals=True, consistent_normals=True)
        points = np.asarray(mesh.points, dtype=np.float64)  # (N, 3)
        corners = np.asarray(oriented.regular_faces)  # (T, 3) vertex indices
        triangles = np.asarray(oriented.points, dtype=np.float64)[corners]  # (T, 3, 3)
        normals = np.asarray(oriented.cell_data["Normals"], dtype=np.float64)  # (T, 3)
        plotter = pv.Plotter(off_screen=True, window_size=(width, height), lighting="light_kit")
        plotter.set_background("black")  # transparent screenshots then hold premultiplied colour
        # no multisampling: on a software GL (llvmpipe) MSAA makes each render 4-6x slower, and
        # the hard silhouette edge matches the binary mask exactly
        plotter.ren_win.SetMultiSamples(0)
        try:
            kwargs = dict(smooth_shading=SHAPE_BY_NAME[spec.kind].smooth, specular=0.3)
            if spec.texture:
                plotter.add_mesh(mesh, texture=_texture(spec.texture), **kwargs)
            else:
                plotter.add_mesh(mesh, color=spec.color, **kwargs)
            plotter.camera.view_angle = spec.view_angle_deg
            probe_radius = 6.0
            area = _silhouette_area(_render_rgba(plotter, orbit_views(spec, 1, probe_radius)[0]))
            radius = _fit_radius(spec, points, n_views, width, height,
                                 probe_radius * np.sqrt(max(area, 1e-4) / spec.target_area))
            views = orbit_views(spec, n_views, radius)
            frames = [_render_rgba(plotter, v) for v in views]
        finally:
            plotter.close()
    return RenderResult(frames=frames, views=views, radius=radius, triangles=triangles, normals=normals)
