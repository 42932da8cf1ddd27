"""The ICBM152 2009a templates bundled with nilearn: registration template and tissue priors.

``nilearn`` ships, inside its wheel, the MNI152 (ICBM 2009a nonlinear symmetric) T1 template,
grey- and white-matter probability templates and a brain mask at 1 mm (197 x 233 x 189 voxels),
so nothing is downloaded. They are an anatomical reference that is no test patient:

- :func:`load_mni152` returns the four images (the T1 set to 0 outside the brain mask, as
  :func:`planar3d.data.register.register_to_host` wants its template);
- :func:`register_mni152_to_host` estimates the host-world -> MNI-world affine;
- :func:`prior_in_host` maps a prior (e.g. the grey-matter template, for cortex hard negatives)
  or the brain mask onto a host scan's grid through that affine.

``"mni152"`` (:data:`MNI152`) is the name that selects this template wherever a template file is
accepted (``planar3d synth --template mni152``).

Example:
    >>> atlas = load_mni152()                                          # doctest: +SKIP
    >>> host_to_mni = register_mni152_to_host(host_img)                 # doctest: +SKIP
    >>> grey_matter = prior_in_host(atlas.gm, host_img, host_to_mni)    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np

from planar3d.errors import InputError

MNI152 = "mni152"
"""Template name meaning the nilearn ICBM152 2009a templates."""


@dataclass(frozen=True)
class MNI152Templates:
    """ICBM152 2009a images at 1 mm in MNI space (all on one grid).

    Attributes:
        t1: T1-weighted template, brain-extracted (0 outside ``brain_mask``), intensities in [0, 1].
        gm: grey-matter probability template in [0, 1].
        wm: white-matter probability template in [0, 1].
        brain_mask: brain mask (uint8 0/1).
    """

    t1: nib.Nifti1Image
    gm: nib.Nifti1Image
    wm: nib.Nifti1Image
    brain_mask: nib.Nifti1Image


@lru_cache(maxsize=1)
def load_mni152() -> MNI152Templates:
    """The four templates from nilearn's bundled files (offline; cached after the first call).

    Raises:
        InputError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError:
        raise InputError(MNI152, "the MNI152 templates come with nilearn: pip install nilearn") from None

    def plain(image, dtype) -> nib.Nifti1Image:
        # nilearn returns images whose data may be read lazily; keep plain arrays on one affine.
        return nib.Nifti1Image(np.asarray(image.get_fdata(dtype=np.float32)).astype(dtype), image.affine)

    mask = plain(datasets.load_mni152_brain_mask(resolution=1), np.uint8)
    t1 = plain(datasets.load_mni152_template(resolution=1), np.float32)
    # nilearn's T1 keeps faint values (<= 0.2, 3,550 voxels) just outside its brain mask; the
    # registration compares the template's foreground only, so make that the brain mask.
    t1 = nib.Nifti1Image(np.where(np.asarray(mask.dataobj) > 0, np.asarray(t1.dataobj), np.float32(0)), t1.affine)
    return MNI152Templates(
        t1=t1,
        gm=plain(datasets.load_mni152_gm_template(resolution=1), np.float32),
        wm=plain(datasets.load_mni152_wm_template(resolution=1), np.float32),
        brain_mask=mask,
    )


def register_mni152_to_host(host_img: nib.Nifti1Image, host_data: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """4x4 matrix mapping the host's world (RAS mm) to MNI world, from the T1 template.

    Mutual information makes a T1 template usable for a FLAIR host. ``host_data`` avoids
    reading the host again when the caller has it.
    """
    from planar3d.data.register import register_to_host

    t1 = load_mni152().t1
    data = np.asarray(host_img.dataobj, dtype=np.float32) if host_data is None else host_data
    return register_to_host(np.asarray(t1.dataobj), t1.affine, data, host_img.affine, seed=seed)


def without_scaling(host_to_mni: np.ndarray, host_point: np.ndarray) -> np.ndarray:
    """The rotation and translation of ``host_to_mni`` about ``host_point`` (host world, mm).

    The rotation is the orthogonal factor of the matrix's polar decomposition; ``host_point``
    maps where the full affine maps it. Sizes are kept: the map for lesion masks that live in a
    *rigidly* aligned MNI space at their patients' own brain size (the MSLUB masks: see
    :func:`mni152_placement`), which the template's 12-parameter fit would shrink or stretch.

    Example:
        >>> m = np.diag([1.2, 1.2, 1.2, 1.0]); m[:3, 3] = [1.0, 2.0, 3.0]
        >>> without_scaling(m, np.zeros(3))[:3].round(3).tolist()
        [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0]]
    """
    matrix = np.asarray(host_to_mni, dtype=np.float64)
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a reflection is no rigid motion; keep it proper
        u[:, -1] *= -1
        rotation = u @ vt
    point = np.asarray(host_point, dtype=np.float64)[:3]
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = matrix[:3, :3] @ point + matrix[:3, 3] - rotation @ point
    return out


def mni152_placement(host_img: nib.Nifti1Image, host_data: np.ndarray | None = None, seed: int = 0):
    """Host-world maps for the template's own images and for rigidly aligned MNI lesion masks.

    Returns:
        ``(host_to_mni, host_to_masks)``: the full affine (for :func:`prior_in_host` and the brain
        mask) and its rotation and translation about the host's white-matter centre
        (:func:`without_scaling`). The MSLUB masks are in MNI position and orientation but at
        each patient's own size (patient26's brain is 1.1 l against 1.9 l for the ICBM152 brain
        mask; the template fits it with scales 1.20-1.29), so placing them through the full
        affine would pull every lesion ~17 % towards the brain centre.
    """
    host_to_mni = register_mni152_to_host(host_img, host_data, seed=seed)
    # Centred on white matter, where MS lesions are (closer than the whole brain's centre, which
    # the cerebellum and a cropped brainstem move: see docs/synthetic_data.md).
    wm = load_mni152().wm
    centre_mni = wm.affine @ np.r_[np.argwhere(np.asarray(wm.dataobj) > 0.5).mean(axis=0), 1.0]
    centre_host = np.linalg.solve(host_to_mni, centre_mni)
    return host_to_mni, without_scaling(host_to_mni, centre_host[:3])


def prior_in_host(prior: nib.Nifti1Image, host_img: nib.Nifti1Image, host_to_mni: np.ndarray) -> np.ndarray:
    """A template image (e.g. :attr:`MNI152Templates.gm`) on the host's grid, float32.

    Trilinear interpolation through ``host_to_mni`` (from :func:`register_mni152_to_host`); 0
    outside the template's field of view.
    """
    from planar3d.data.inject import resample_to_host

    data = np.asarray(prior.dataobj, dtype=np.float32)
    return resample_to_host(data, prior.affine, host_img, host_to_mni, order=1).astype(np.float32)


def grey_matter_prior_in_host(host_img: nib.Nifti1Image, host_to_mni: np.ndarray | None = None,
                              host_data: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Grey-matter probability (cortex and deep grey matter) on the host's grid.

    Registers the T1 template to the host when ``host_to_mni`` is not given. Meant for sampling
    hard negatives on cortex, which is bright in FLAIR and a common false positive.
    """
    if host_to_mni is None:
        host_to_mni = register_mni152_to_host(host_img, host_data, seed=seed)
    return prior_in_host(load_mni152().gm, host_img, host_to_mni)
