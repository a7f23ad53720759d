"""A procedural, seeded 3D head model and a fast point-splatting renderer.

Each identity is a star-shaped surface r(lat, lon) around the head centre in the canonical face
frame (+Z out of the face, +Y up, +X toward the subject's left): an ellipsoidal skull plus smooth
bumps and ridges for the brow ridge, eye sockets and eyeballs, nose (length, width, height),
cheeks, cheekbones, lips, chin, jaw taper and ears. Its albedo has a skin tone, hair colour and
hairline, eyebrows, eye colour, lip colour and marks (moles). An expression deforms the mouth,
brows and cheeks.

Identity lives both in shape and in appearance, and most appearance cues (brows, eyes, lips,
marks) sit on the front of the face: at a 90°+ yaw they are hidden or foreshortened, and the
remaining cues (nose profile, chin, ear, hair, skin tone) must carry the identity, as with real
faces. Lighting, background and noise change from sample to sample.

The renderer projects the surface grid orthographically at a given yaw/pitch, shades it
(Lambert + ambient + a little specular) and splats points with a depth buffer; it renders a
112×112 sample in a few milliseconds. The image crop and the point clouds share one normalised
face frame per (identity, expression) (:func:`face_frame`), and :func:`project_to_image` is the
crop: a point of the cloud lands exactly where the image shows that part of the face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXPRESSIONS = ("neutral", "smile", "open", "surprise", "frown")
EXPRESSION_PROBS = (0.4, 0.2, 0.15, 0.15, 0.1)

_HAIR = np.array(
    [[0.06, 0.05, 0.05], [0.20, 0.12, 0.07], [0.38, 0.25, 0.14], [0.72, 0.58, 0.34],
     [0.55, 0.22, 0.10], [0.60, 0.60, 0.60]], dtype=np.float32)
_SKIN_LIGHT = np.array([0.95, 0.80, 0.70], dtype=np.float32)
_SKIN_DARK = np.array([0.36, 0.23, 0.15], dtype=np.float32)
_EYE = np.array([[0.25, 0.14, 0.07], [0.20, 0.35, 0.60], [0.25, 0.45, 0.25], [0.42, 0.45, 0.48]],
                dtype=np.float32)

#: grid resolution of the rendered surface (lat x lon)
RENDER_GRID = (96, 192)
#: the crop: a point at face-frame coordinates q (see :func:`face_frame`) lands at image pixel
#: ``size/2 + CROP_SCALE*size*(q . right)``, ``size/2 - CROP_SCALE*size*(q . up)``
#: (:func:`project_to_image`). With face-frame radii ~1.16 head units, 0.56 keeps the head about
#: as large as generator version 1's crop did (head silhouette ~64 % of the image on average, was
#: ~66 %); the face proper (forehead to chin, cheek to cheek) stays >= 2.5 px inside a 112 px crop
#: at |yaw| <= 100 and |pitch| <= 15; an ear may lose a few pixels at the edge at some poses.
CROP_SCALE = 0.56
#: grid resolution of the face mesh the points come from (and of the face frame)
MESH_GRID = (64, 128)


@dataclass(frozen=True)
class Identity:
    """Shape and appearance parameters of one synthetic person."""

    axes: tuple[float, float, float]
    jaw_taper: float
    brow: float
    eye_depth: float
    eye_sep: float
    eye_lat: float
    nose_len: float
    nose_width: float
    nose_height: float
    cheek: float
    cheekbone: float
    lips: float
    mouth_width: float
    chin: float
    ear_size: float
    ear_out: float
    skin: float
    skin_hue: float
    hair: int
    hairline: float
    brow_thick: float
    brow_arch: float
    eye_color: int
    lip_red: float
    marks: tuple[tuple[float, float, float], ...]


def _u(rng: np.random.Generator, lo: float, hi: float, strength: float) -> float:
    """A value in [lo, hi], pulled toward the middle when ``strength`` < 1."""
    mid = 0.5 * (lo + hi)
    return float(mid + (rng.uniform(lo, hi) - mid) * min(strength, 1.0) * 1.0)


def sample_identity(rng: np.random.Generator, strength: float = 1.0) -> Identity:
    s = strength
    n_marks = int(rng.integers(0, 4))
    marks = tuple(
        (float(rng.uniform(-0.55, 0.35)), float(rng.uniform(-0.75, 0.75)), float(rng.uniform(0.012, 0.03)))
        for _ in range(n_marks)
    )
    return Identity(
        axes=(_u(rng, 0.74, 0.86, s), _u(rng, 0.98, 1.12, s), _u(rng, 0.88, 1.02, s)),
        jaw_taper=_u(rng, 0.05, 0.25, s),
        brow=_u(rng, 0.0, 0.07, s),
        eye_depth=_u(rng, 0.03, 0.09, s),
        eye_sep=_u(rng, 0.26, 0.36, s),
        eye_lat=_u(rng, 0.08, 0.16, s),
        nose_len=_u(rng, 0.16, 0.32, s),
        nose_width=_u(rng, 0.06, 0.13, s),
        nose_height=_u(rng, 0.10, 0.30, s),
        cheek=_u(rng, 0.0, 0.06, s),
        cheekbone=_u(rng, 0.0, 0.05, s),
        lips=_u(rng, 0.01, 0.05, s),
        mouth_width=_u(rng, 0.18, 0.30, s),
        chin=_u(rng, 0.0, 0.09, s),
        ear_size=_u(rng, 0.10, 0.20, s),
        ear_out=_u(rng, 0.06, 0.16, s),
        skin=_u(rng, 0.0, 1.0, s),
        skin_hue=_u(rng, -0.06, 0.06, s),
        hair=int(rng.integers(0, len(_HAIR))),
        hairline=_u(rng, 0.42, 0.80, s),
        brow_thick=_u(rng, 0.015, 0.045, s),
        brow_arch=_u(rng, -0.04, 0.06, s),
        eye_color=int(rng.integers(0, len(_EYE))),
        lip_red=_u(rng, 0.0, 1.0, s),
        marks=marks,
    )


def _grid(nl: int, np_: int) -> tuple[np.ndarray, np.ndarray]:
    lat = np.linspace(-math.pi / 2 + 0.02, math.pi / 2 - 0.02, nl, dtype=np.float32)
    lon = np.linspace(-math.pi, math.pi, np_, endpoint=False, dtype=np.float32)
    return np.meshgrid(lat, lon, indexing="ij")


def _bump(lat, lon, c_lat, c_lon, s_lat, s_lon):
    dlon = np.angle(np.exp(1j * (lon - c_lon))).astype(np.float32) if abs(c_lon) > 2.5 else lon - c_lon
    return np.exp(-0.5 * (((lat - c_lat) / s_lat) ** 2 + (dlon / s_lon) ** 2))


def _features(ident: Identity, expression: str):
    """Latitudes of the facial landmarks, moved by the expression."""
    eye_lat = ident.eye_lat
    nose_top = eye_lat + 0.02
    tip = nose_top - ident.nose_len
    mouth = tip - 0.17
    mw, brow_up, mouth_open, corner = ident.mouth_width, 0.0, 0.0, 0.0
    if expression == "smile":
        mw, corner = mw * 1.18, 0.05
    elif expression == "open":
        mouth_open = 0.07
    elif expression == "surprise":
        brow_up, mouth_open = 0.05, 0.04
    elif expression == "frown":
        brow_up, corner, mw = -0.025, -0.03, mw * 0.92
    return dict(eye=eye_lat, nose_top=nose_top, tip=tip, mouth=mouth, mw=mw, brow_up=brow_up,
                mouth_open=mouth_open, corner=corner)


def head_radius(ident: Identity, expression: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Radius of the head surface along each (lat, lon) direction."""
    f = _features(ident, expression)
    cl, sl = np.cos(lat), np.sin(lat)
    dx, dy, dz = cl * np.sin(lon), sl, cl * np.cos(lon)
    a, b, c = ident.axes
    r = 1.0 / np.sqrt((dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2)
    # jaw: the lower sides of the face narrow
    low = np.clip(-lat / 0.9, 0.0, 1.0)
    r = r * (1.0 - ident.jaw_taper * low ** 1.5 * np.sin(lon) ** 2)
    d = np.zeros_like(r)
    eye, sep = f["eye"], ident.eye_sep
    d += (ident.brow + 0.01) * _bump(lat, lon, eye + 0.13 + f["brow_up"], 0.0, 0.05, 0.45)
    for side in (-1.0, 1.0):
        d -= ident.eye_depth * _bump(lat, lon, eye, side * sep, 0.07, 0.11)
        d += 0.6 * ident.eye_depth * _bump(lat, lon, eye, side * sep, 0.035, 0.06)
        d += ident.cheek * _bump(lat, lon, f["tip"] - 0.05, side * 0.42, 0.13, 0.16)
        d += ident.cheekbone * _bump(lat, lon, eye - 0.1, side * 0.62, 0.06, 0.13)
        # ears sit a little behind the side of the head
        d += ident.ear_out * _bump(lat, lon, eye - 0.05, side * 1.72, ident.ear_size, 0.07)
    # nose: a ridge that grows from the bridge to the tip, then falls away
    t = np.clip((f["nose_top"] - lat) / max(f["nose_top"] - f["tip"], 1e-3), 0.0, 1.0)
    below = np.exp(-0.5 * (np.minimum(lat - f["tip"], 0.0) / 0.035) ** 2)
    width = ident.nose_width * (0.55 + 0.6 * t)
    ridge = ident.nose_height * t ** 1.3 * below * np.exp(-0.5 * (lon / width) ** 2)
    d += np.where(lat <= f["nose_top"], ridge, 0.0)
    for side in (-1.0, 1.0):
        d += 0.25 * ident.nose_height * _bump(lat, lon, f["tip"] + 0.01, side * ident.nose_width * 1.15 * 1.3, 0.03, 0.05)
    # lips with the mouth line between them; corners move with the expression
    m, mw = f["mouth"], f["mw"]
    lip_lon = np.exp(-0.5 * (lon / (0.55 * mw)) ** 4)
    corner_shift = f["corner"] * (lon / mw) ** 2
    d += ident.lips * lip_lon * np.exp(-0.5 * ((lat - (m + 0.035 + corner_shift)) / 0.025) ** 2)
    d += ident.lips * lip_lon * np.exp(-0.5 * ((lat - (m - 0.04 - f["mouth_open"] + corner_shift)) / 0.03) ** 2)
    d -= (0.02 + f["mouth_open"] * 0.8) * lip_lon * np.exp(
        -0.5 * ((lat - (m - f["mouth_open"] / 2 + corner_shift)) / (0.008 + f["mouth_open"] / 3)) ** 2)
    d += (ident.chin + 0.01) * _bump(lat, lon, m - 0.28, 0.0, 0.09, 0.22)
    return (r + d).astype(np.float32)


def head_albedo(ident: Identity, expression: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """RGB albedo in [0, 1] on the (lat, lon) grid."""
    f = _features(ident, expression)
    skin = (1 - ident.skin) * _SKIN_LIGHT + ident.skin * _SKIN_DARK
    skin = skin * np.array([1 + ident.skin_hue, 1.0, 1 - ident.skin_hue], dtype=np.float32)
    col = np.broadcast_to(skin, lat.shape + (3,)).copy()

    def paint(mask: np.ndarray, rgb) -> None:
        m = np.clip(mask, 0.0, 1.0)[..., None]
        col[:] = col * (1 - m) + np.asarray(rgb, dtype=np.float32) * m

    hair = _HAIR[ident.hair]
    # hair: above the hairline on the front, over the top and back of the head
    back = np.clip((np.abs(lon) - 1.9) / 0.3, 0.0, 1.0) * np.clip((lat + 0.1) / 0.2, 0.0, 1.0)
    top = np.clip((lat - ident.hairline) / 0.05, 0.0, 1.0)
    side_top = np.clip((lat - 0.35) / 0.05, 0.0, 1.0) * np.clip((np.abs(lon) - 0.9) / 0.2, 0.0, 1.0)
    paint(np.maximum(np.maximum(back, top), side_top), hair)
    lips = (0.55 + 0.2 * ident.lip_red) * skin + np.array([0.25, -0.02, -0.02], dtype=np.float32) * (0.5 + ident.lip_red)
    m = f["mouth"]
    lip_mask = np.exp(-0.5 * (lon / (0.5 * f["mw"])) ** 6) * np.exp(
        -0.5 * ((lat - m + f["mouth_open"] / 2) / (0.045 + f["mouth_open"] / 2)) ** 4)
    paint(lip_mask, np.clip(lips, 0, 1))
    paint(lip_mask * np.exp(-0.5 * ((lat - m + f["mouth_open"] / 2) / (0.004 + f["mouth_open"] / 3)) ** 2),
          (0.15, 0.05, 0.05))
    eye_rgb = _EYE[ident.eye_color]
    for side in (-1.0, 1.0):
        c = side * ident.eye_sep
        paint(np.exp(-0.5 * (((lat - f["eye"]) / 0.022) ** 2 + ((lon - c) / 0.065) ** 2) ** 3), (0.92, 0.92, 0.9))
        paint(np.exp(-0.5 * (((lat - f["eye"]) / 0.021) ** 2 + ((lon - c) / 0.024) ** 2) ** 3), eye_rgb)
        paint(np.exp(-0.5 * (((lat - f["eye"]) / 0.008) ** 2 + ((lon - c) / 0.008) ** 2)), (0.02, 0.02, 0.02))
        # eyebrow: an arched band above the eye
        u = (lon - c) / 0.17
        arch = f["eye"] + 0.1 + f["brow_up"] + ident.brow_arch * (1 - u ** 2)
        paint(0.9 * np.exp(-0.5 * (u ** 6 + ((lat - arch) / ident.brow_thick) ** 6)), 0.6 * hair)
    for (ml, mo, ms) in ident.marks:
        paint(np.exp(-0.5 * (((lat - ml) / ms) ** 2 + ((lon - mo) / ms) ** 2) ** 2), 0.45 * skin)
    return col.astype(np.float32)


#: the part of the grid an expression can change: (lat range, max |lon|)
_EXPR_WINDOW = ((-1.0, 0.75), 1.1)


class HeadSurface:
    """Positions, normals and albedo of one identity with one expression on the render grid.

    ``HeadSurface.for_expression`` reuses a neutral surface and recomputes only the window of the
    grid an expression can change, which makes a new expression ~6x cheaper than a new head.
    """

    def __init__(self, ident: Identity, expression: str = "neutral", grid: tuple[int, int] = RENDER_GRID,
                 _radius: np.ndarray | None = None, _albedo: np.ndarray | None = None):
        lat, lon = _grid(*grid)
        r = head_radius(ident, expression, lat, lon) if _radius is None else _radius
        albedo = head_albedo(ident, expression, lat, lon) if _albedo is None else _albedo
        cl = np.cos(lat)
        dirs = np.stack([cl * np.sin(lon), np.sin(lat), cl * np.cos(lon)], axis=-1)
        pos = dirs * r[..., None]
        # normals from the grid's partial derivatives (lon wraps around)
        d_lat = np.gradient(pos, axis=0)
        d_lon = np.roll(pos, -1, axis=1) - np.roll(pos, 1, axis=1)
        n = np.cross(d_lon, d_lat)
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-8
        flip = (n * dirs).sum(-1, keepdims=True) < 0
        n = np.where(flip, -n, n)
        self.ident, self.expression, self.grid = ident, expression, grid
        self.radius, self.albedo_grid = r, albedo
        self._frame: tuple[np.ndarray, float] | None = None
        # one (N, 12) table: position, normal, albedo, radial direction
        self.table = np.concatenate(
            [pos.reshape(-1, 3), n.reshape(-1, 3), albedo.reshape(-1, 3), dirs.reshape(-1, 3)], axis=1
        ).astype(np.float32)

    @property
    def pos(self) -> np.ndarray:
        return self.table[:, 0:3]

    @property
    def normal(self) -> np.ndarray:
        return self.table[:, 3:6]

    @property
    def albedo(self) -> np.ndarray:
        return self.table[:, 6:9]

    @property
    def frame(self) -> tuple[np.ndarray, float]:
        """``(centre, radius)`` of this identity's face frame with this expression (:func:`face_frame`)."""
        if self._frame is None:
            self._frame = face_frame(self.ident, self.expression)
        return self._frame

    def for_expression(self, expression: str) -> "HeadSurface":
        if expression == self.expression:
            return self
        lat, lon = _grid(*self.grid)
        (lo, hi), max_lon = _EXPR_WINDOW
        rows = np.nonzero((lat[:, 0] >= lo) & (lat[:, 0] <= hi))[0]
        cols = np.nonzero(np.abs(lon[0]) <= max_lon)[0]
        win = np.ix_(rows, cols)
        r = self.radius.copy()
        a = self.albedo_grid.copy()
        r[win] = head_radius(self.ident, expression, lat[win], lon[win])
        a[win] = head_albedo(self.ident, expression, lat[win], lon[win])
        return HeadSurface(self.ident, expression, self.grid, _radius=r, _albedo=a)


def view_dir(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Unit vector from the face centre to the camera: yaw = atan2(d_x, d_z), pitch = asin(d_y)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return np.array([math.sin(y) * math.cos(p), math.sin(p), math.cos(y) * math.cos(p)], dtype=np.float32)


def camera_basis(yaw_deg: float, pitch_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(right, up, d)`` of the orthographic camera at (yaw, pitch): d = :func:`view_dir`,
    right = cross(+Y, d) / |.|, up = cross(d, right). At (0, 0): right = +X, up = +Y."""
    d = view_dir(yaw_deg, pitch_deg)
    right = np.cross(np.array([0.0, 1.0, 0.0], dtype=np.float32), d)
    right /= np.linalg.norm(right)
    up = np.cross(d, right)
    return right.astype(np.float32), up.astype(np.float32), d


def project_to_image(points_norm: np.ndarray, yaw_deg: float, pitch_deg: float, size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates ``(px, py)`` of face-frame points seen from (yaw, pitch).

    ``points_norm [..., 3]`` are in the normalised face frame (:func:`face_frame`; the frame of
    the shards' ``points``). ``px = size/2 + CROP_SCALE*size*(q . right)`` runs left to right and
    ``py = size/2 - CROP_SCALE*size*(q . up)`` top to bottom; pixel (row k, column l) covers
    ``[l, l+1) x [k, k+1)``. :func:`render` places every surface point with this function, so a
    point of the cloud lands exactly where the renderer draws that part of the face.
    """
    right, up, _ = camera_basis(yaw_deg, pitch_deg)
    q = np.asarray(points_norm, dtype=np.float32)
    scale = np.float32(CROP_SCALE * size)
    half = np.float32(size / 2)
    return half + scale * (q @ right), half - scale * (q @ up)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    other = np.clip(base + rng.normal(0, 0.25, 3), 0, 1).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip((xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang) + 0.5, 0, 1)[..., None]
    # coarse blobs: upsampled low-resolution noise
    coarse = rng.uniform(-0.12, 0.12, (4, 4, 3)).astype(np.float32)
    rep = -(-size // 4)
    blobs = np.repeat(np.repeat(coarse, rep, 0), rep, 1)[:size, :size]
    return np.clip(base * (1 - t) + other * t + blobs, 0, 1)


def render(surface: HeadSurface, yaw_deg: float, pitch_deg: float, rng: np.random.Generator,
           size: int = 112, noise: float = 6.0) -> np.ndarray:
    """Render ``surface`` seen from (yaw, pitch) as a ``size``×``size`` RGB uint8 image."""
    right, up, d = camera_basis(yaw_deg, pitch_deg)
    # back faces (normal away from the camera) are culled; the depth buffer does the rest
    t = surface.table[surface.table[:, 3:6] @ d > 0.0]
    pos, nrm, alb = t[:, 0:3], t[:, 3:6], t[:, 6:9]
    # lighting: a key light near the camera side, an ambient term, a little specular
    light = d + rng.normal(0, 0.7, 3).astype(np.float32)
    light /= np.linalg.norm(light)
    half = light + d
    half /= np.linalg.norm(half)
    ambient = rng.uniform(0.3, 0.5)
    key = rng.uniform(0.55, 0.85)
    tint = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    shade = nrm @ np.stack([light, half], 1)
    lam = np.clip(shade[:, 0], 0.0, 1.0)
    spec = np.clip(shade[:, 1], 0.0, 1.0) ** 20 * rng.uniform(0.0, 0.25)
    color = alb * ((ambient + key * lam)[:, None] * tint) + spec[:, None]
    # orthographic projection of the normalised face frame, the same for the points of the cloud
    # (project_to_image). Like an aligned face crop, it centres on the middle of the face (the
    # face frame's centre), so a profile view still shows the face side. No random crop jitter:
    # the crop is exactly reproducible from the cloud's frame (the data pipeline's shift/zoom
    # augmentation adds misalignment during training).
    centre, radius = surface.frame
    fx, fy = project_to_image(((pos - centre) / radius).astype(np.float32), yaw_deg, pitch_deg, size)
    depth = pos @ d
    # a point covers the 2x2 pixels centred on it: from (floor(fx - 1/2), floor(fy - 1/2)) right and
    # down; keep those that touch the image
    px = np.floor(fx - 0.5).astype(np.int32)
    py = np.floor(fy - 0.5).astype(np.int32)
    inside = (px >= -1) & (px < size) & (py >= -1) & (py < size)
    px, py, depth, color = px[inside], py[inside], depth[inside], color[inside]
    img = np.zeros((size + 2, size + 2, 3), dtype=np.float32)  # one pixel of margin all round
    img[1:-1, 1:-1] = _background(rng, size)
    order = np.argsort(depth, kind="stable")  # far first: nearer points overwrite
    flat = (py[order] + 1) * (size + 2) + (px[order] + 1)
    color = color[order]
    img = img.reshape(-1, 3)
    # each point covers 2x2 pixels so the grid leaves no holes at this resolution
    for off in (0, 1, size + 2, size + 3):
        img[flat + off] = color
    img = img.reshape(size + 2, size + 2, 3)[1:-1, 1:-1]
    img = img.reshape(size, size, 3) * 255.0
    if noise > 0:
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def face_mesh_arrays(ident: Identity, expression: str, grid: tuple[int, int] = MESH_GRID
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The front of the head (face and ears) as ``(vertices [V, 3] float64, triangles [T, 3] int64)``
    in the canonical frame (head units); plain numpy, the geometry of :func:`face_mesh`."""
    nl, nlon = grid
    lat, lon = _grid(nl, nlon)
    r = head_radius(ident, expression, lat, lon)
    cl = np.cos(lat)
    pos = np.stack([cl * np.sin(lon), np.sin(lat), cl * np.cos(lon)], -1) * r[..., None]
    keep = (np.abs(lon) <= 0.62 * math.pi) & (lat <= 1.0)
    idx = -np.ones((nl, nlon), dtype=np.int64)
    idx[keep] = np.arange(int(keep.sum()))
    a, b = idx[:-1, :-1], idx[:-1, 1:]
    c, e = idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([b, e, c], -1).reshape(-1, 3)])
    tri = tri[(tri >= 0).all(1)]
    return pos[keep].astype(np.float64), tri


def _frame_of(vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, float]:
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    centre = (area[:, None] * (a + b + c)).sum(0) / (3.0 * area.sum())
    return centre, float(np.linalg.norm(vertices - centre, axis=1).max())


def face_frame(ident: Identity, expression: str) -> tuple[np.ndarray, float]:
    """``(centre [3] float64, radius)`` of the normalised face frame of (identity, expression).

    ``centre`` is the area-weighted centroid of the face mesh's triangles (the expected mean of
    points sampled uniformly from it) and ``radius`` the largest vertex distance from it, both from
    :func:`face_mesh_arrays` on ``MESH_GRID``. A point p of the head maps to ``(p - centre) / radius``:
    the point clouds (:func:`sample_face_points`) lie in this frame (centred, inside the unit
    ball) and the image crop (:func:`project_to_image`) is defined in it.
    """
    return _frame_of(*face_mesh_arrays(ident, expression))


def face_mesh(ident: Identity, expression: str, grid: tuple[int, int] = MESH_GRID):
    """The front of the head (face and ears) as an open3d triangle mesh in the canonical frame."""
    import posefr_dist.data.o3d as o3d_loader

    o3d = o3d_loader.open3d()
    vertices, tri = face_mesh_arrays(ident, expression, grid)
    return o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(vertices),
        o3d.utility.Vector3iVector(tri.astype(np.int32)),
    )


def normalize_points(pts: np.ndarray) -> np.ndarray:
    """Centre a point set and scale it to unit radius (max distance from the centre = 1)."""
    pts = pts - pts.mean(0, keepdims=True)
    return (pts / max(float(np.linalg.norm(pts, axis=1).max()), 1e-8)).astype(np.float32)


def sample_face_points(ident: Identity, expression: str, n: int, seed: int) -> np.ndarray:
    """``n`` points sampled uniformly from the face mesh with open3d, in the normalised face frame
    (:func:`face_frame`): ``(p - centre) / radius``, so their mean is ~0 (up to sampling) and they
    lie inside the unit ball; the image crop is defined in the same frame."""
    import posefr_dist.data.o3d as o3d_loader

    o3d = o3d_loader.open3d()
    o3d.utility.random.seed(int(seed) % (2**31))
    vertices, tri = face_mesh_arrays(ident, expression)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices),
                                     o3d.utility.Vector3iVector(tri.astype(np.int32)))
    pcd = mesh.sample_points_uniformly(number_of_points=n)
    centre, radius = _frame_of(vertices, tri)
    return ((np.asarray(pcd.points) - centre) / radius).astype(np.float32)
