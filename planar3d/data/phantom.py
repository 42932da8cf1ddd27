"""Synthetic raw FLAIR head phantoms with multiple-sclerosis-like lesions.

The head is built from analytic, approximately signed-distance fields in a canonical head frame
(millimetres, RAS axes, origin near the brain centre): a perturbed brain ellipsoid with layers of
subarachnoid CSF, skull, fat and skin around it, a neck, cortical folding from a random-wave
field (sulci are its zero sheets), an interhemispheric fissure, two C-shaped lateral ventricles,
deep grey nuclei and ellipsoidal lesions in white matter. Each tissue gets a partial-volume
fraction per voxel (a linear ramp of the signed distance one voxel wide, plus explicit averaging
over sub-slices for thick slices); intensities are mixed from the fractions, then a smooth
multiplicative bias field and Rician noise are applied.

Everything is evaluated on a grid laid out in RAS world space and then re-oriented (flipped or
permuted) with :mod:`nibabel.orientations`, so the anatomy is correct in world coordinates for
any requested orientation and the affine matches the array.

Example:
    >>> import numpy as np
    >>> flair, lesions, affine = make_phantom(np.random.default_rng(0), size="small")
    >>> flair.shape, lesions.dtype
    ((64, 64, 48), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations as ornt
from scipy.spatial import cKDTree

from planar3d.errors import ConfigError

SIZES = ("small", "full")
GEOMETRIES = ("3d", "thick")

#: Canonical brain ellipsoid semi-axes (mm) and layer thicknesses (mm).
_BRAIN_AXES = np.array([64.0, 80.0, 56.0])
_CSF_EXT = 2.5
_GM_THICKNESS = 2.6
_SULCUS_DEPTH = 14.0
_FOLD_WAVELENGTH = 24.0

#: Lateral ventricle centreline (x, y, z in mm, right side; mirrored for the left) and radii.
_VENT_NODES = np.array(
    [
        [9, 28, 8], [11, 18, 15], [12, 6, 19], [13, -8, 19], [16, -22, 14],
        [20, -29, 3], [24, -25, -9], [27, -15, -17], [28, -5, -21],
    ],
    dtype=float,
)
_VENT_RADII = np.array([4.0, 5.5, 6.0, 6.0, 6.0, 6.5, 5.0, 3.5, 2.5])


@dataclass
class Phantom:
    """One generated case and what it was made of.

    Attributes:
        flair: the FLAIR image (float32), with bias field and Rician noise.
        lesions: binary lesion label (uint8), lesion fraction >= 0.5.
        affine: voxel-to-world (RAS+ mm) 4x4 affine of both arrays.
        clean: the noise-free, bias-free FLAIR (float32).
        tissues: partial-volume fraction maps (float32) keyed by tissue name.
        lesion_fraction: partial-volume lesion fraction (float32).
        info: scalar facts about the case (lesion load, intensities, head pose...).
        brain: partial-volume brain fraction (float32), the phantom's own brain mask at >= 0.5.
        grey_matter: partial-volume fraction of cortex and deep grey nuclei (float32), the
            phantom's counterpart of the ICBM152 grey-matter prior mapped into a real host.
    """

    flair: np.ndarray
    lesions: np.ndarray
    affine: np.ndarray
    clean: np.ndarray
    tissues: dict = field(default_factory=dict)
    lesion_fraction: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    brain: np.ndarray | None = None
    grey_matter: np.ndarray | None = None


def preset_geometry(size: str, geometry: str, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Return (shape, spacing) of a preset acquisition, in RAS-like axis order (LR, AP, SI).

    ``small`` is a ~3.3 mm grid of the same head for fast CPU training (64x64x48 for 3D);
    ``full`` is ~1 mm 3D (176x208x176) or a thick-slice axial scan with in-plane spacing drawn in
    0.7-1.0 mm and slice thickness in 3-5 mm. ``small`` thick keeps the in-plane grid of small 3D
    and draws slices of 6.6-11 mm (about the same in-plane/slice ratio as ``full`` thick).

    Args:
        size: ``"small"`` or ``"full"``.
        geometry: ``"3d"`` or ``"thick"``.
        rng: random generator (used only for thick-slice spacings).

    Raises:
        ConfigError: unknown size or geometry.
    """
    if size not in SIZES:
        raise ConfigError(f"size must be one of {SIZES}, got {size!r}")
    if geometry not in GEOMETRIES:
        raise ConfigError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if geometry == "3d":
        if size == "small":
            return (64, 64, 48), (3.3, 3.3, 3.3)
        return (176, 208, 176), (1.0, 1.0, 1.0)
    inplane = float(np.round(rng.uniform(0.7, 1.0), 3))
    thickness = float(np.round(rng.uniform(3.0, 5.0), 2))
    if size == "small":
        inplane, thickness = 3.3, float(np.round(thickness * 2.2, 2))
        n = 64
    else:
        n = int(16 * round(224.0 / inplane / 16))
    slices = int(round(168.0 / thickness))
    return (n, n, slices), (inplane, inplane, thickness)


def make_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "RAS",
    *,
    size: str = "small",
    geometry: str = "3d",
    lesion_load: float | None = None,
    noise: bool = True,
    bias: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one raw-looking FLAIR head with lesions.

    Args:
        rng: random generator; the same generator state gives the same case.
        shape: array shape in the output orientation, or None for the preset of size/geometry.
        spacing: voxel size (mm) along the array axes; given together with ``shape``.
        orientation: axis codes of the array, e.g. ``"RAS"``, ``"LPS"``, ``"LAS"``.
        size: preset size when shape is None (``"small"`` or ``"full"``).
        geometry: preset geometry when shape is None (``"3d"`` or ``"thick"``).
        lesion_load: lesion volume as a fraction of brain volume; None draws it log-uniformly
            in 0.08-2.5 %.
        noise: add Rician noise.
        bias: multiply by a smooth bias field (+-20 % at most).

    Returns:
        ``(flair float32, lesions uint8, affine float64 4x4)``.

    Example:
        >>> f, l, a = make_phantom(np.random.default_rng(1), orientation="LPS")
        >>> nib.aff2axcodes(a)
        ('L', 'P', 'S')
    """
    p = make_phantom_parts(
        rng, shape, spacing, orientation, size=size, geometry=geometry,
        lesion_load=lesion_load, noise=noise, bias=bias,
    )
    return p.flair, p.lesions, p.affine


# ----------------------------------------------------------------------------------------------
# fields


def _ramp(inside: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``inside`` mm inside a boundary."""
    return np.clip(0.5 + inside / np.float32(width), 0.0, 1.0).astype(np.float32, copy=False)


def _ellipsoid_sd(p: np.ndarray, center, axes) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    k0 = np.zeros(len(p), np.float32)
    k1 = np.zeros(len(p), np.float32)
    for a in range(3):
        u = (p[:, a] - np.float32(center[a])) * np.float32(1.0 / axes[a])
        u *= u
        k0 += u
        u *= np.float32(1.0 / axes[a] ** 2)
        k1 += u
    np.sqrt(k0, out=k0)
    np.sqrt(k1, out=k1)
    np.maximum(k1, 1e-6, out=k1)
    return k0 * (k0 - 1.0) / k1


class _Waves:
    """Smooth random field: a sum of plane waves with unit variance; |grad| has rms 2*pi/wavelength."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength: float):
        direction = rng.standard_normal((n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lengths = wavelength * rng.uniform(0.8, 1.25, n)
        self.k = (2 * np.pi * direction / lengths[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self.norm = np.float32(np.sqrt(2.0 / n))
        self.gradient_rms = float(2 * np.pi / wavelength)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros(len(p), np.float32)
        for k, ph in zip(self.k, self.phase):
            out += np.cos(p @ k + ph)
        return out * self.norm


class _Anatomy:
    """The random anatomy of one case, evaluated on arbitrary points of the head frame."""

    def __init__(self, rng: np.random.Generator):
        self.brain_axes = _BRAIN_AXES * rng.uniform(0.95, 1.05, 3)
        self.shape_noise = _Waves(rng, 6, 90.0)
        self.shape_amp = rng.uniform(1.0, 2.0)
        self.layer_noise = _Waves(rng, 6, 60.0)
        self.skull = rng.uniform(5.0, 7.0)
        self.fat = rng.uniform(2.5, 5.0)
        self.skin = 1.5
        self.folds = _Waves(rng, 24, _FOLD_WAVELENGTH)
        self.sulcus_width = rng.uniform(0.6, 1.2)  # half-width at the surface, mm
        vent_scale = rng.uniform(0.8, 1.5)  # atrophy widens the ventricles
        nodes = _VENT_NODES + rng.normal(0, 1.5, _VENT_NODES.shape)
        t = np.linspace(0, len(nodes) - 1, 33)
        dense = np.stack([np.interp(t, np.arange(len(nodes)), nodes[:, a]) for a in range(3)], 1)
        radii = np.interp(t, np.arange(len(nodes)), _VENT_RADII) * vent_scale
        mirrored = dense * np.array([-1.0, 1.0, 1.0])
        self.vent_centers = np.concatenate([dense, mirrored]).astype(np.float32)
        self.vent_radii = np.concatenate([radii, radii]).astype(np.float32)
        self.vent_xratio = 0.55
        self.vent_scaled = self.vent_centers * np.array([1.0 / self.vent_xratio, 1.0, 1.0], np.float32)
        self.vent_tree = cKDTree(self.vent_scaled)
        self.deep_gm = [  # thalamus and lentiform nucleus, both sides
            ((sx * 10.0, -12.0, 2.0), (8.0, 13.0, 8.0)) for sx in (-1, 1)
        ] + [((sx * 22.0, 6.0, -1.0), (6.0, 13.0, 9.0)) for sx in (-1, 1)]

    def skull_q(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the pial surface of the brain, negative inside."""
        return _ellipsoid_sd(p, (0, 0, 0), self.brain_axes) + self.shape_amp * self.shape_noise(p)

    def ventricle_sd(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the lateral ventricles (union of ellipsoid nodes)."""
        out = np.full(len(p), 1e3, np.float32)
        box = (np.abs(p[:, 0]) < 45) & (p[:, 1] > -50) & (p[:, 1] < 45) & (np.abs(p[:, 2]) < 35)
        scale = np.array([1.0 / self.vent_xratio, 1.0, 1.0], np.float32)
        q = p[box] * scale
        _, nearest = self.vent_tree.query(q, k=6)
        d = np.linalg.norm(q[:, None, :] - self.vent_scaled[nearest], axis=2) - self.vent_radii[nearest]
        out[box] = d.min(axis=1) * np.float32(self.vent_xratio ** 0.5)
        return out

    def deep_gm_sd(self, p: np.ndarray) -> np.ndarray:
        return np.min([_ellipsoid_sd(p, c, a) for c, a in self.deep_gm], axis=0)

    def sulcus_sd(self, p: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to sulcal and fissural CSF inside the brain."""
        sulci = (depth - _SULCUS_DEPTH).astype(np.float32)
        shallow = np.flatnonzero(depth < _SULCUS_DEPTH + _GM_THICKNESS + 4.0)
        f = self.folds(p[shallow])
        half = self.sulcus_width * np.clip(1.0 - depth[shallow] / _SULCUS_DEPTH, 0.2, 1.0)
        sulci[shallow] = np.maximum(np.abs(f) / self.folds.gradient_rms - half, sulci[shallow])
        core = _ellipsoid_sd(p, (0, -5, 2), (24, 48, 26))  # corpus callosum and deep structures
        fissure = np.maximum(np.abs(p[:, 0]) - 1.0, -core)
        return np.minimum(sulci, fissure).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# generation


def _random_rotation(rng: np.random.Generator, degrees) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-1, 1, 3) * np.asarray(degrees))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _orientation_transform(orientation: str):
    """Return the nibabel transform from RAS array axes to ``orientation`` array axes."""
    code = tuple(orientation.upper())
    if len(code) != 3:
        raise ConfigError(f"orientation must be 3 axis codes like 'RAS', got {orientation!r}")
    try:
        target = ornt.axcodes2ornt(code)
    except Exception as error:  # nibabel raises ValueError for bad codes
        raise ConfigError(f"orientation {orientation!r} is not a valid set of axis codes: {error}") from None
    if np.isnan(target).any() or len(set(target[:, 0])) != 3:
        raise ConfigError(f"orientation {orientation!r} is not a valid set of axis codes")
    return ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")), target), target


def make_phantom_parts(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "RAS",
    *,
    size: str = "small",
    geometry: str = "3d",
    lesion_load: float | None = None,
    noise: bool = True,
    bias: bool = True,
    min_lesion_volume: float | None = None,
    keep_tissues: bool = False,
    brain_extracted: bool = False,
) -> Phantom:
    """Like :func:`make_phantom`, but return a :class:`Phantom` with tissue maps and facts.

    Args:
        keep_tissues: fill :attr:`Phantom.tissues` with the fraction maps (slower).
        brain_extracted: look like a preprocessed scan: everything outside the brain (brain
            fraction < 0.5: outer CSF, skull, scalp, neck) is set to exactly 0 after the noise,
            as skull-stripping tools leave it. The random stream is the same as without it, so
            the anatomy and lesions are those of the raw case of the same seed.
        min_lesion_volume: smallest lesion volume (mm^3); None uses 1.5 voxel volumes of the
            output grid, so that lesions stay visible on coarse grids.
        (others): as in :func:`make_phantom`.
    """
    if (shape is None) != (spacing is None):
        raise ConfigError("give both shape and spacing, or neither (to use the size/geometry preset)")
    transform, target = _orientation_transform(orientation)
    if shape is None:
        shape, spacing = preset_geometry(size, geometry, rng)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ConfigError(f"shape and spacing must be 3 positive values, got {shape} and {spacing}")
    if lesion_load is not None and not 0 <= lesion_load < 0.5:
        raise ConfigError(f"lesion_load must be a fraction in [0, 0.5), got {lesion_load}")

    # Every step below draws from ``rng`` in this order; reordering them changes every phantom.
    grid = _sampling_grid(shape, spacing, target)
    pose = _HeadPose(_random_rotation(rng, (10.0, 5.0, 8.0)), rng.uniform(0.92, 1.06),
                     rng.uniform(-6, 6, 3) * np.array([1.0, 1.0, 0.6]))
    anatomy = _Anatomy(rng)
    head, active = _head_points(grid, pose, anatomy)
    w = np.float32(grid.width / pose.scale)  # ramp width in head-frame mm
    tissues, q, b = _head_layers(anatomy, head, w)
    _brain_tissues(anatomy, head, q, b, w, tissues)
    del head, q
    n_fine = int(np.prod(grid.fine_shape))
    for name, values in list(tissues.items()):
        full = np.zeros(n_fine, np.float32)
        full[active] = values
        tissues[name] = full
    brain_fraction = np.zeros(n_fine, np.float32)
    brain_fraction[active] = b
    del b
    voxel_mm3 = float(np.prod(grid.ras_spacing)) / grid.sub
    brain_volume = float(brain_fraction.sum(dtype=np.float64)) * voxel_mm3

    # Lesions in white matter.
    if lesion_load is None:
        lesion_load = float(np.exp(rng.uniform(np.log(0.0008), np.log(0.025))))
    if min_lesion_volume is None:
        min_lesion_volume = 1.5 * float(np.prod(grid.ras_spacing))
    wm_grid = tissues["wm"].reshape(grid.fine_shape)
    lesion = np.zeros(grid.fine_shape, np.float32)
    placed = _place_lesions(
        rng, anatomy, lesion, wm_grid, grid.axes_mm, pose.rotation, pose.scale, pose.shift, grid.width,
        lesion_load * brain_volume, voxel_mm3, min_lesion_volume,
    )
    lesion_flat = (lesion * wm_grid).ravel()
    tissues["wm"] = tissues["wm"] - lesion_flat

    wm_level, levels, lesion_level, clean = _clean_image(rng, tissues, lesion_flat)
    tissues["lesion"] = lesion_flat
    tissues["brain"] = brain_fraction

    clean_out = _to_output(clean, grid, transform)
    lesion_out = _to_output(lesion_flat, grid, transform)
    brain_out = _to_output(brain_fraction, grid, transform)
    grey_matter_out = _to_output(tissues["gm"] + tissues["deep_gm"], grid, transform)
    tissue_out = {k: _to_output(v, grid, transform) for k, v in tissues.items() if k != "lesion"} if keep_tissues else {}
    del clean, tissues

    image, sigma = _acquire(rng, clean_out, wm_level, bias, noise, brain_out if brain_extracted else None)
    affine = grid.ras_affine @ ornt.inv_ornt_aff(transform, tuple(grid.ras_shape))
    labels = (lesion_out >= 0.5).astype(np.uint8)
    info = {
        "lesion_load_target": lesion_load,
        "lesion_volume_mm3": float(lesion_out.sum(dtype=np.float64) * np.prod(spacing)),
        "brain_volume_mm3": brain_volume,
        "lesions_placed": placed,
        "wm_level": wm_level,
        "lesion_level": lesion_level,
        "levels": levels,
        "noise_sigma": sigma,
        "spacing": spacing,
        "shape": shape,
        "orientation": orientation.upper(),
        "sub_slices": grid.sub,
        "brain_extracted": bool(brain_extracted),
    }
    return Phantom(
        flair=image.astype(np.float32, copy=False), lesions=labels, affine=affine, clean=clean_out,
        tissues=tissue_out, lesion_fraction=lesion_out, info=info, brain=brain_out,
        grey_matter=grey_matter_out,
    )


@dataclass
class _SamplingGrid:
    """Where a phantom is sampled: the output grid in RAS order, refined along thick slices."""

    ras_shape: list
    ras_spacing: np.ndarray
    ras_affine: np.ndarray
    slice_axis: int
    sub: int  # samples per slice along slice_axis (slice profile)
    fine_shape: np.ndarray
    axes_mm: list  # world coordinates of the samples along each axis
    width: float  # partial-volume ramp width (mm)


def _sampling_grid(shape, spacing, target) -> _SamplingGrid:
    """The RAS grid (output axis a is world axis ``target[a, 0]``); thick slices are sampled at
    several sub-slice positions and averaged later (the slice profile)."""
    ras_shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for a in range(3):
        ras_shape[int(target[a, 0])] = shape[a]
        ras_spacing[int(target[a, 0])] = spacing[a]
    ras_spacing_arr = np.array(ras_spacing)
    ras_shape_arr = np.array(ras_shape)
    center = np.array([0.0, 0.0, -8.0])  # brain centre sits a little above the grid centre
    origin = center - (ras_shape_arr - 1) / 2.0 * ras_spacing_arr
    ras_affine = np.eye(4)
    ras_affine[:3, :3] = np.diag(ras_spacing_arr)
    ras_affine[:3, 3] = origin

    slice_axis = int(np.argmax(ras_spacing_arr))
    inplane = float(np.delete(ras_spacing_arr, slice_axis).max())
    sub = int(min(3, np.ceil(ras_spacing_arr[slice_axis] / inplane - 0.25))) if ras_spacing_arr[slice_axis] > 1.5 * inplane else 1
    fine_shape = ras_shape_arr.copy()
    fine_shape[slice_axis] *= sub
    axes_mm = []
    for a in range(3):
        if a == slice_axis and sub > 1:
            offs = (np.arange(sub) + 0.5) / sub - 0.5
            idx = (np.arange(ras_shape[a])[:, None] + offs[None, :]).ravel()
        else:
            idx = np.arange(ras_shape[a], dtype=float)
        axes_mm.append((origin[a] + idx * ras_spacing_arr[a]).astype(np.float32))
    return _SamplingGrid(ras_shape, ras_spacing_arr, ras_affine, slice_axis, sub, fine_shape, axes_mm, inplane)


@dataclass
class _HeadPose:
    """Random pose of the head: world = rotation (scale * h) + shift."""

    rotation: np.ndarray
    scale: float
    shift: np.ndarray


def _head_points(grid: _SamplingGrid, pose: _HeadPose, anatomy: "_Anatomy") -> tuple[np.ndarray, np.ndarray]:
    """Head-frame coordinates of the samples near the head, and their indices in the fine grid
    (the rest is air and is never evaluated)."""
    n_fine = int(np.prod(grid.fine_shape))
    world = np.empty((n_fine, 3), np.float32)
    grids = np.meshgrid(*grid.axes_mm, indexing="ij")
    for a in range(3):
        world[:, a] = grids[a].ravel()
    del grids
    head = ((world - pose.shift.astype(np.float32)) @ pose.rotation.astype(np.float32)) / np.float32(pose.scale)
    del world
    big = anatomy.brain_axes + 30.0
    r2 = (head[:, 0] / np.float32(big[0])) ** 2 + (head[:, 1] / np.float32(big[1])) ** 2
    neck_r2 = (head[:, 0] / np.float32(62)) ** 2 + ((head[:, 1] + 12) / np.float32(70)) ** 2
    r2 += (head[:, 2] / np.float32(big[2])) ** 2
    active = np.flatnonzero((r2 < 1) | ((neck_r2 < 1) & (head[:, 2] < -20)))
    return np.ascontiguousarray(head[active]), active


def _head_layers(anatomy: "_Anatomy", head: np.ndarray, w) -> tuple[dict, np.ndarray, np.ndarray]:
    """Skin, fat, muscle, skull and outer CSF around the brain, with thicknesses varying smoothly
    over the head; returns ``(tissue fractions, brain distance q, brain fraction b)``."""
    q = anatomy.skull_q(head)
    layer = anatomy.layer_noise(head)
    skull_t = anatomy.skull + 0.8 * layer
    fat_t = anatomy.fat + 1.0 * layer
    outer = q - (_CSF_EXT + skull_t + fat_t + anatomy.skin)
    neck = np.maximum(
        _ellipsoid_sd(np.c_[head[:, :2], np.zeros(len(head), np.float32)], (0, -12, 0), (54, 62, 1)),
        head[:, 2] + 30.0,
    )
    d_head = np.minimum(outer, neck)
    h0 = _ramp(-d_head, w)
    h1 = _ramp(-(d_head + anatomy.skin), w)
    h2 = _ramp(-(d_head + anatomy.skin + fat_t), w)
    s_out = _ramp(-(q - _CSF_EXT - skull_t), w)
    s_in = _ramp(-(q - _CSF_EXT), w)
    b = _ramp(-q, w)
    tissues = {
        "skin": np.clip(h0 - h1, 0, 1),
        "fat": np.clip(h1 - np.maximum(h2, s_out), 0, 1),
        "muscle": np.clip(h2 - s_out, 0, 1),
        "skull": np.clip(np.minimum(s_out, h0) - s_in, 0, 1),
        "csf": np.clip(np.minimum(s_in, h0) - b, 0, 1),
    }
    for name in ("gm", "wm", "deep_gm", "ventricles"):
        tissues[name] = np.zeros(len(head), np.float32)
    return tissues, q, b


def _brain_tissues(anatomy: "_Anatomy", head: np.ndarray, q: np.ndarray, b: np.ndarray, w, tissues: dict) -> None:
    """Inside the brain: cortex, sulci, white matter, ventricles, deep grey nuclei (in place)."""
    inside = np.flatnonzero(b > 0)
    pb = head[inside]
    bb = b[inside]
    depth = -q[inside]
    ssd = anatomy.sulcus_sd(pb, depth)
    sulcal_csf = _ramp(-ssd, w)
    to_csf = np.minimum(depth, ssd)
    wm = _ramp(to_csf - _GM_THICKNESS, w)
    gm = np.clip(1.0 - sulcal_csf - wm, 0, 1)
    vent = _ramp(-anatomy.ventricle_sd(pb), w)
    nuclei = _ramp(-anatomy.deep_gm_sd(pb), w)
    dgm = (1 - vent) * nuclei
    wm_final = wm * (1 - vent) * (1 - nuclei)
    gm_final = gm * (1 - vent) * (1 - nuclei)
    tissues["csf"][inside] += bb * (sulcal_csf + vent * (wm + gm))
    tissues["ventricles"][inside] = bb * vent * (wm + gm)
    tissues["gm"][inside] = bb * gm_final
    tissues["deep_gm"][inside] = bb * dgm * (wm + gm)
    tissues["wm"][inside] = bb * wm_final


def _clean_image(rng: np.random.Generator, tissues: dict, lesion_flat: np.ndarray):
    """Noise-free intensities, scanner-like units with white matter near 300:
    ``(wm_level, tissue levels, lesion level, image)``."""
    wm_level = rng.uniform(260, 340)
    levels = {
        "skin": wm_level * rng.uniform(1.0, 1.3),
        "fat": wm_level * rng.uniform(1.6, 2.1),
        "muscle": wm_level * rng.uniform(0.55, 0.75),
        "skull": wm_level * rng.uniform(0.03, 0.08),
        "csf": wm_level * rng.uniform(0.08, 0.2),
        "ventricles": 0.0,  # counted within csf
        "gm": wm_level * rng.uniform(1.12, 1.28),
        "deep_gm": wm_level * rng.uniform(1.05, 1.15),
        "wm": wm_level,
    }
    lesion_level = wm_level * rng.uniform(1.5, 1.9)
    clean = np.zeros(len(lesion_flat), np.float32)
    for name, fraction in tissues.items():
        if levels[name]:
            clean += np.float32(levels[name]) * fraction
    clean += np.float32(lesion_level) * lesion_flat
    return wm_level, levels, lesion_level, clean


def _to_output(a: np.ndarray, grid: _SamplingGrid, transform) -> np.ndarray:
    """Fine samples -> output grid: average the sub-slices, then the output orientation."""
    a = a.reshape(grid.fine_shape)
    if grid.sub > 1:
        index = [slice(None)] * 3
        total = np.zeros(grid.ras_shape, np.float32)
        for j in range(grid.sub):
            index[grid.slice_axis] = slice(j, None, grid.sub)
            total += a[tuple(index)]
        a = total / np.float32(grid.sub)
    return np.ascontiguousarray(ornt.apply_orientation(a, transform)).astype(np.float32, copy=False)


def _acquire(rng: np.random.Generator, clean: np.ndarray, wm_level: float, bias: bool, noise: bool,
             brain: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The scanner: bias field, Rician noise, then (skull-stripped look) zero outside the brain;
    returns ``(image, noise sigma)``."""
    image = clean
    if bias:
        image = image * _bias_field(rng, clean.shape)
    else:
        _bias_field(rng, (2, 2, 2))  # keep the random stream identical
    sigma = wm_level * rng.uniform(0.02, 0.045)
    if noise:
        real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
        imag = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
    if brain is not None:
        image = np.where(brain >= 0.5, image, np.float32(0))
    return image, sigma


def _bias_field(rng: np.random.Generator, shape) -> np.ndarray:
    """Smooth multiplicative field: exp of a random 2nd-order polynomial, within +-20 %."""
    coords = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    c = rng.normal(0, 1, 9).astype(np.float32)
    poly = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z
    poly = poly + c[6] * x * x + c[7] * y * y + c[8] * z * z
    peak = float(np.abs(poly).max()) or 1.0
    amplitude = rng.uniform(0.08, np.log(1.2))
    return np.exp(poly * np.float32(amplitude / peak)).astype(np.float32)


def _place_lesions(
    rng, anatomy, lesion, wm_grid, axes_mm, rotation, scale, shift, width, target_mm3, voxel_mm3, min_volume
) -> int:
    """Paint ellipsoidal lesions (union, as fractions) into ``lesion`` until ``target_mm3`` of WM."""
    if target_mm3 <= 0:
        return 0
    # Candidate centres: white matter points, weighted towards periventricular and juxtacortical.
    cand = rng.uniform(-1, 1, (6000, 3)) * anatomy.brain_axes
    cand = cand[np.sum((cand / anatomy.brain_axes) ** 2, 1) < 0.8].astype(np.float32)
    depth = -anatomy.skull_q(cand)
    to_csf = np.minimum(depth, anatomy.sulcus_sd(cand, depth))
    vent = anatomy.ventricle_sd(cand)
    ok = (to_csf > _GM_THICKNESS + 1.0) & (vent > 0.5) & (anatomy.deep_gm_sd(cand) > 1.0)
    weight = np.where(vent < 8.0, 5.0, np.where(to_csf < _GM_THICKNESS + 5.0, 2.0, 0.7))[ok]
    cand, vent = cand[ok], vent[ok]
    weight /= weight.sum()
    # Volumes: log-normal small lesions, and some of the load in a few large confluent ones.
    load_share = rng.uniform(0.3, 0.7) if target_mm3 > 2500 else 0.0
    n_conf = 0 if load_share == 0 else int(rng.integers(1, 4))
    spacing = np.array([ax[1] - ax[0] if len(ax) > 1 else 1.0 for ax in axes_mm])
    origins = np.array([ax[0] for ax in axes_mm])
    total = 0.0
    placed = 0
    periventricular = np.flatnonzero(vent < 8.0)

    def paint(center_h, semi, rot) -> float:
        c_world = rotation @ (scale * center_h) + shift
        reach = semi.max() + width
        lo = np.maximum(np.floor((c_world - reach - origins) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((c_world + reach - origins) / spacing).astype(int) + 1, lesion.shape)
        if np.any(hi <= lo):
            return 0.0
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        px, py, pz = np.meshgrid(*[axes_mm[a][sl[a]] for a in range(3)], indexing="ij")
        p = np.stack([px.ravel(), py.ravel(), pz.ravel()], 1) - c_world.astype(np.float32)
        local = p @ rot.astype(np.float32)
        sd = _ellipsoid_sd(local, (0, 0, 0), semi)
        frac = _ramp(-sd, width).reshape(px.shape)
        old = lesion[sl]
        new = np.maximum(old, frac)
        gain = float(((new - old) * wm_grid[sl]).sum(dtype=np.float64)) * voxel_mm3
        lesion[sl] = new
        return gain

    def random_rot():
        qm, r = np.linalg.qr(rng.standard_normal((3, 3)))
        return qm * np.sign(np.diag(r))

    def semi_axes(volume):
        r = (3 * volume / (4 * np.pi)) ** (1 / 3)
        e = rng.uniform(0.75, 1.35, 2)
        return np.array([r * e[0], r * e[1], r / (e[0] * e[1])])

    small_target = target_mm3 * (1 - load_share)
    while total < small_target and placed < 300:
        volume = max(float(rng.lognormal(np.log(20.0), 1.0)), min_volume)
        center = cand[rng.choice(len(cand), p=weight)] + rng.normal(0, 1.0, 3).astype(np.float32)
        total += paint(center, semi_axes(volume), random_rot())
        placed += 1
    for i in range(n_conf):
        if total >= target_mm3 or len(periventricular) == 0:
            break
        goal = total + (target_mm3 - total) / (n_conf - i)
        hub = cand[rng.choice(periventricular)]
        radius = (3 * (goal - total) / (4 * np.pi)) ** (1 / 3)
        for _ in range(60):
            if total >= goal:
                break
            offset = rng.normal(0, 0.6 * radius, 3)
            volume = max(float(rng.lognormal(np.log(max(goal - total, 20.0) / 6), 0.5)), min_volume)
            total += paint(hub + offset.astype(np.float32), semi_axes(volume), random_rot())
        placed += 1
    return placed
