"""Write a synthetic training set (images, labels, manifest) to a folder.

Cases are either phantoms (:mod:`planar3d.data.phantom`), cycling deterministically through the
requested geometries and orientations, or one real host FLAIR with real lesion masks injected
(:mod:`planar3d.data.inject`). Each file is written atomically (temporary file in the same folder,
then ``os.replace``) and gzip-compressed with a zero timestamp, so one seed always gives
byte-identical files.

Example:
    >>> manifest = write_synthetic_dataset("synth", cases=10, seed=0)
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from planar3d.data.manifest import Case, Manifest, save_manifest
from planar3d.errors import InputError
from planar3d.io import atomic_write, make_folder, read_volume, write_json


def _file_stem(path: str | Path) -> str:
    """A file's name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def save_nifti_deterministic(array: np.ndarray, affine: np.ndarray, path: Path, header=None, code: int = 1) -> str:
    """Write ``array`` as a gzipped NIfTI-1 (mtime 0) atomically; return its sha256 hex digest.

    Both qform and sform are set to ``affine`` with ``code`` (1 scanner, 2 aligned).
    """
    img = nib.Nifti1Image(array, affine, header=header)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    raw = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_write(path, "wb") as stream:
        stream.write(raw)
    return hashlib.sha256(raw).hexdigest()


def read_template(template: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A registration template: ``"mni152"`` (nilearn's ICBM152 2009a T1) or a NIfTI file."""
    from planar3d.data.atlas import MNI152, load_mni152

    if str(template) == MNI152:
        t1 = load_mni152().t1
        return np.asarray(t1.dataobj, dtype=np.float32), t1
    return read_volume(template)


BRAIN_MASK_FOLDER = "brain_masks"
#: Lesion loads (lesion volume over the brain) that make a case "light" (below) or "heavy" (from):
#: issue 9's evaluation classes; light-load scans are where false positives dominate.
LIGHT_LOAD_MAX = 0.002
HEAVY_LOAD_MIN = 0.01


def brain_mask_path(image: str | Path) -> Path:
    """Where ``planar3d synth`` writes the brain mask of a case image: ``brain_masks/<image name>``
    beside the case's ``images/`` folder (a sidecar, so the manifest format does not change).

    The brain mask is what training weights hard-negative patch centres with
    (:class:`planar3d.sampling.PatchCentreIndicesd`), so they fall on bright structures of the
    brain rather than on the scalp. It is computed once per case here, at data preparation, where
    the host-to-MNI152 registration is at hand anyway (phantoms: their own brain fraction).
    """
    image = Path(image)
    return image.parent.parent / BRAIN_MASK_FOLDER / image.name


GREY_MATTER_FOLDER = "grey_matter"


def grey_matter_path(image: str | Path) -> Path:
    """Where ``planar3d synth`` writes the grey-matter map of a case image:
    ``grey_matter/<image name>`` beside ``images/``, uint8 **percent** (0-100) on the image's grid.

    Training can weight hard-negative centres towards grey matter with it
    (``data.hard_negative.grey_matter_weight``): the false positives of models trained without a
    host lie in that host's cortex and deep grey matter (docs/training.md, "Issue 9, eleventh
    session"). For injected cases it is the ICBM152 grey-matter template (cortex and deep grey
    nuclei) mapped through the host's registration, for phantoms their own cortex and deep grey
    fractions. Percent in uint8 takes a quarter of float32's bytes; the reader divides by 100.
    """
    image = Path(image)
    return image.parent.parent / GREY_MATTER_FOLDER / image.name


def grey_matter_percent(fraction: np.ndarray) -> np.ndarray:
    """A grey-matter fraction map as :func:`grey_matter_path` stores it (uint8 percent, rounded)."""
    return np.rint(np.clip(fraction, 0.0, 1.0) * 100.0).astype(np.uint8)


def case_lesion_load(image: str | Path, label: str | Path) -> float:
    """Lesion voxels over brain voxels of a case (voxels share one grid, so volumes cancel).

    The brain is the case's :func:`brain_mask_path` sidecar when ``planar3d synth`` wrote one, else
    the image's non-zero voxels (a brain-extracted scan such as MSLUB's). The one definition of a
    case's load for choosing and scoring light and heavy cases (benchmarks/build_training_set.py,
    benchmarks/score_cases.py).
    """
    sidecar = brain_mask_path(image)
    brain = nib.load(str(sidecar if sidecar.is_file() else image))
    lesions = np.count_nonzero(np.asanyarray(nib.load(str(label)).dataobj) > 0)
    return float(lesions) / max(int(np.count_nonzero(np.asanyarray(brain.dataobj))), 1)


HOST_LESIONS_FILE = "host_lesions.nii.gz"
"""Where ``write_synthetic_dataset`` with ``host_lesions`` ``"fill"`` or ``"label"`` writes the
host voxels it filled or labelled (0/1)."""


def _factor_range(out_dir: Path, name: str, value) -> tuple[float, float]:
    """``value`` as ``(low, high)`` floats with ``0 < low <= high``, else an InputError naming ``name``."""
    low, high = (float(v) for v in value)
    if not 0 < low <= high:
        raise InputError(out_dir, f"{name} must be 0 < low <= high, got {value}")
    return low, high


def _treat_host_lesions(mode: str, host_data: np.ndarray, host_img: nib.Nifti1Image, brain: np.ndarray,
                        host_to_mni: np.ndarray, own_label: np.ndarray | None, seed: int):
    """``(host, added label or None, what was found, the voxels changed)`` for ``mode`` "fill" or "label"
    (:mod:`planar3d.data.host_lesions`)."""
    from planar3d.data.atlas import load_mni152, prior_in_host
    from planar3d.data.host_lesions import fill_lesions, suspected_lesions

    found = suspected_lesions(host_data, brain, prior_in_host(load_mni152().wm, host_img, host_to_mni), host_img.affine)
    if own_label is not None:  # labelled lesions are lesions already
        known = np.asarray(own_label) > 0
        found = replace(found, lesions=found.lesions & ~known, mask=found.mask & ~known)
    if mode == "label":
        return host_data, found.lesions, found, found.lesions
    # a stream of its own: the cases' streams ([seed, i], [seed, i, 1]) stay as they were
    return fill_lesions(host_data, found, np.random.default_rng([seed, 0, 2])), None, found, found.mask


GREY_MATTER_CONTRAST_FILE = "grey_matter_contrast.json"
"""Where ``write_synthetic_dataset`` with ``grey_matter_contrast`` writes each case's factor."""


def write_synthetic_dataset(
    out_dir: str | Path,
    cases: int,
    seed: int,
    size: str = "small",
    geometries: tuple[str, ...] = ("3d", "thick"),
    orientations: tuple[str, ...] = ("RAS", "LPS", "LAS"),
    host: str | Path | None = None,
    host_label: str | Path | None = None,
    lesion_masks_dir: str | Path | None = None,
    brain_extracted: float = 0.0,
    template: str | Path | None = None,
    max_masks_per_case: int = 4,
    host_lesions: str = "keep",
    grey_matter_contrast: tuple[float, float] | None = None,
    lesion_contrast: tuple[float, float] | None = None,
    lesion_edge: tuple[float, float] | None = None,
) -> Path:
    """Generate ``cases`` cases into ``out_dir`` and return the path of its ``manifest.json``.

    Case ``i`` uses geometry ``geometries[i % G]`` and orientation
    ``orientations[(i // G) % O]`` and the random generator ``default_rng([seed, i])``. With
    ``host``, every case is the host FLAIR with a different random subset (1 to
    ``max_masks_per_case``) of the masks in ``lesion_masks_dir`` injected (plus the host's own
    label); geometry and orientation are then the host's.

    Args:
        out_dir: output folder (created); ``images/``, ``labels/`` and ``manifest.json`` go in it,
            and ``brain_masks/`` (:func:`brain_mask_path`) for phantoms and for a host with a
            ``template`` (the template's brain mapped onto the host), and ``grey_matter/``
            (:func:`grey_matter_path`) for phantoms and for a host with ``template="mni152"``.
        cases: number of cases (>= 1).
        seed: random seed.
        size: ``"small"`` (~3.3 mm, fast) or ``"full"`` (~1 mm) phantoms.
        geometries: any of ``"3d"``, ``"thick"``.
        orientations: axis codes such as ``"RAS"``, ``"LPS"``, ``"LAS"``.
        host: a real FLAIR to inject lesions into, instead of phantoms.
        host_label: the host's lesion mask (optional).
        lesion_masks_dir: folder of lesion masks to inject (required with ``host``).
        brain_extracted: fraction of the cases written skull-stripped (0 outside the brain;
            phantoms also without bias field), like the preprocessed scans of public data sets;
            which cases are is drawn from ``default_rng([seed, i, 1])``, so the other cases do
            not change. With a host, the brain is the ``template``'s foreground mapped onto it.
        template: with ``host``: the brain-extracted image the lesion masks were drawn on (same
            world space as the masks, e.g. a FLAIR or template in MNI space), or ``"mni152"``
            for nilearn's ICBM152 2009a T1 (:mod:`planar3d.data.atlas`; the recommended choice
            for the MNI lesion masks: no test patient is used as reference). It is registered
            to the host (affine, :mod:`planar3d.data.register`) and the masks are placed through
            that registration, so they land in the host's white matter even when the host is in
            its own scanner space. Without it the masks are placed by world coordinates.
        max_masks_per_case: with ``host``: at most this many masks per case (1: light-load cases
            from a folder of light masks).
        host_lesions: with ``host``, its own unlabelled lesions (:mod:`planar3d.data.host_lesions`):
            ``"keep"`` them as they are (background), ``"fill"`` them with white matter before
            injection, or ``"label"`` them in every case. ``fill`` and ``label`` need
            ``template="mni152"`` (the white-matter prior) and write the voxels they changed to
            :data:`HOST_LESIONS_FILE`.
        grey_matter_contrast: with ``host`` and ``template="mni152"``: ``(low, high)``; each case's
            grey matter is scaled by a factor drawn uniformly in that range
            (:func:`planar3d.data.tissue_contrast.scale_grey_matter`, from
            ``default_rng([seed, i, 2])``, so the cases are otherwise those of the same seed
            without it), and the factors are written to :data:`GREY_MATTER_CONTRAST_FILE`.
        lesion_contrast: with ``host``: ``(low, high)``, the range in which each case's injected
            lesion level is drawn, as a factor of the host's white-matter level (None: 1.3-1.8,
            :data:`planar3d.data.inject.LESION_CONTRAST`); other scanners' lesion contrast. The
            other draws of a case do not change with it.
        lesion_edge: with ``host``: ``(low, high)`` in ``[0, 1]``; each case's injected lesions are
            graded, their outermost voxels at a share of the lesion's contrast drawn uniformly in
            that range (``default_rng([seed, i, 3])``), rising to the full level inside
            (:func:`planar3d.data.inject.inject_lesions` ``edge_contrast``). None: the flat lesions
            of before. The other draws of a case do not change with it.

    Raises:
        InputError: bad arguments (named after ``out_dir``) or unreadable host/mask files.
    """
    from planar3d.data.phantom import GEOMETRIES, SIZES, _orientation_transform, make_phantom_parts

    out_dir = Path(out_dir)
    if not isinstance(cases, int) or cases < 1:
        raise InputError(out_dir, f"cases must be a positive integer, got {cases!r}")
    if not isinstance(max_masks_per_case, int) or max_masks_per_case < 1:
        raise InputError(out_dir, f"max_masks_per_case must be a positive integer, got {max_masks_per_case!r}")
    if size not in SIZES:
        raise InputError(out_dir, f"size must be one of {', '.join(SIZES)}, got {size!r}")
    geometries, orientations = tuple(geometries), tuple(o.upper() for o in orientations)
    if not geometries or any(g not in GEOMETRIES for g in geometries):
        raise InputError(out_dir, f"geometries must be among {', '.join(GEOMETRIES)}, got {geometries}")
    for o in orientations or ("",):
        try:
            _orientation_transform(o)
        except ValueError as error:
            raise InputError(out_dir, str(error)) from None
    if host is None and (host_label is not None or lesion_masks_dir is not None):
        raise InputError(out_dir, "host_label and lesion_masks_dir need a host FLAIR")
    if not 0.0 <= brain_extracted <= 1.0:
        raise InputError(out_dir, f"brain_extracted must be a fraction in [0, 1], got {brain_extracted!r}")
    if host is None and template is not None:
        raise InputError(template, "a template is used only with a host FLAIR")
    if host is not None and brain_extracted and template is None:
        raise InputError(host, "brain_extracted with a host FLAIR needs a brain-extracted template (its brain mask)")
    if host is not None and lesion_masks_dir is None:
        raise InputError(host, "a host FLAIR needs lesion_masks_dir (masks to inject)")
    from planar3d.data.host_lesions import HOST_LESION_MODES

    if host_lesions not in HOST_LESION_MODES:
        raise InputError(out_dir, f"host_lesions must be one of {', '.join(HOST_LESION_MODES)}, got {host_lesions!r}")
    if host_lesions != "keep" and (host is None or str(template) != "mni152"):
        raise InputError(out_dir, f"host_lesions {host_lesions!r} needs a host FLAIR and template 'mni152' (its white-matter "
                                  f"prior tells lesions from cortex)")

    if grey_matter_contrast is not None:
        if host is None or str(template) != "mni152":
            raise InputError(out_dir, "grey_matter_contrast needs a host FLAIR and template 'mni152' (its grey-matter prior)")
        low, high = _factor_range(out_dir, "grey_matter_contrast", grey_matter_contrast)

    if lesion_contrast is not None:
        if host is None:
            raise InputError(out_dir, "lesion_contrast needs a host FLAIR (phantoms draw their own lesions)")
        lesion_contrast = _factor_range(out_dir, "lesion_contrast", lesion_contrast)
    if lesion_edge is not None:
        if host is None:
            raise InputError(out_dir, "lesion_edge needs a host FLAIR (phantoms draw their own lesions)")
        edge_low, edge_high = (float(v) for v in lesion_edge)
        if not 0.0 <= edge_low <= edge_high <= 1.0:
            raise InputError(out_dir, f"lesion_edge must be 0 <= low <= high <= 1, got {lesion_edge}")

    images, labels = out_dir / "images", out_dir / "labels"
    make_folder(images)
    make_folder(labels)

    host_data, found, added_label, changed, grey_matter = None, None, None, None, None
    if host is not None:
        from scipy import ndimage

        from planar3d.data.atlas import MNI152, mni152_placement
        from planar3d.data.inject import LESION_CONTRAST, inject_lesions, lesion_masks_from_folder, resample_to_host
        from planar3d.data.register import MAX_BRAIN_ON_AIR, MIN_BRAIN_COVERAGE, brain_coverage, register_to_host, share_on_air

        host_data, host_img = read_volume(host)
        own = None
        if host_label is not None:
            own, label_img = read_volume(host_label)
            if own.shape != host_data.shape:
                raise InputError(host_label, f"host label shape {own.shape} differs from the host's {host_data.shape}")
        host_to_masks, brain = None, None
        if template is not None:
            template_data, template_img = read_template(template)
            host_to_template = None
            try:
                if str(template) == MNI152:
                    # The masks are rigidly in MNI space at their patients' size: rigid part only.
                    host_to_template, host_to_masks = mni152_placement(host_img, host_data, seed=seed)
                else:
                    host_to_masks = register_to_host(template_data, template_img.affine, host_data, host_img.affine, seed=seed)
            except (RuntimeError, ValueError) as error:  # SimpleITK raises RuntimeError
                raise InputError(template, f"registration to {Path(host).name} failed: {error}") from None
            # the brain is mapped whether or not cases are skull-stripped: it is also every
            # case's brain mask for hard-negative sampling (brain_mask_path)
            to_template = host_to_masks if host_to_template is None else host_to_template
            brain = resample_to_host((template_data > 0).astype(np.uint8), template_img.affine, host_img, to_template)
            template_voxel_mm3 = abs(float(np.linalg.det(template_img.affine[:3, :3])))
            coverage = brain_coverage(int(np.count_nonzero(brain)), abs(float(np.linalg.det(host_img.affine[:3, :3]))),
                                      int(np.count_nonzero(template_data > 0)) * template_voxel_mm3, to_template)
            if coverage < MIN_BRAIN_COVERAGE:
                raise InputError(host, f"after registration to {Path(str(template)).name} only {coverage:.0%} of the template's "
                                       f"brain lies inside this scan: a failed registration (or a scan that does not cover "
                                       f"the brain); lesions would land in the wrong anatomy")
            on_air = share_on_air(brain > 0, host_data)
            if on_air > MAX_BRAIN_ON_AIR:
                raise InputError(host, f"after registration to {Path(str(template)).name} {on_air:.0%} of the template's "
                                       f"brain lies on air in this scan (at most {MAX_BRAIN_ON_AIR:.0%}): a fit in the wrong "
                                       f"place; lesions would land outside the head (another --seed fits anew)")
            brain = ndimage.binary_fill_holes(brain > 0)
            if str(template) == MNI152:
                from planar3d.data.atlas import load_mni152, prior_in_host

                grey_fraction = prior_in_host(load_mni152().gm, host_img, host_to_template) * brain
                grey_matter = grey_matter_percent(grey_fraction)
        if host_lesions != "keep":
            host_data, added_label, found, changed = _treat_host_lesions(host_lesions, host_data, host_img, brain,
                                                                         host_to_template, own, seed)
        masks = lesion_masks_from_folder(lesion_masks_dir, host_img, host_to_masks)
        # the host's name, so cases of different heads with one orientation get different keys
        # (planar3d.data.hosts.host_key)
        host_group = f"host-{_file_stem(host)}-" + "".join(nib.aff2axcodes(host_img.affine))
        qcode = int(host_img.header["qform_code"]) or 1
        description = (
            f"planar3d synth seed={seed} cases={cases} host={Path(host).name} "
            f"host_label={Path(host_label).name if host_label else None} masks={Path(lesion_masks_dir).name} ({len(masks)})"
            + (f" template={Path(template).name}" if template is not None else "")
            + (f" brain_extracted={brain_extracted:g}" if brain_extracted else "")
            + (f" max_masks_per_case={max_masks_per_case}" if max_masks_per_case != 4 else "")
            + (f" host_lesions={host_lesions} ({found.count} lesions, {found.volume_mm3 / 1000:.2f} ml)" if found is not None else "")
            + (f" grey_matter_contrast={low:g}-{high:g}" if grey_matter_contrast is not None else "")
            + (f" lesion_contrast={lesion_contrast[0]:g}-{lesion_contrast[1]:g}" if lesion_contrast is not None else "")
            + (f" lesion_edge={edge_low:g}-{edge_high:g}" if lesion_edge is not None else "")
        )
        if grey_matter_contrast is not None:
            from planar3d.preprocess import white_matter_level

            host_white_matter = white_matter_level(host_data)[0]
    else:
        description = (
            f"planar3d synth seed={seed} cases={cases} size={size} "
            f"geometries={','.join(geometries)} orientations={','.join(orientations)}"
            + (f" brain_extracted={brain_extracted:g}" if brain_extracted else "")
        )

    if changed is not None:
        save_nifti_deterministic(changed.astype(np.uint8), host_img.affine, out_dir / HOST_LESIONS_FILE, code=qcode)

    entries, contrast_factors = [], {}
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        stripped = bool(brain_extracted) and np.random.default_rng([seed, i, 1]).random() < brain_extracted
        case_id = f"case_{i:03d}"
        image_path = images / f"{case_id}_flair.nii.gz"
        label_path = labels / f"{case_id}_lesions.nii.gz"
        if host_data is None:
            geometry = geometries[i % len(geometries)]
            orientation = orientations[(i // len(geometries)) % len(orientations)]
            phantom = make_phantom_parts(rng, orientation=orientation, size=size, geometry=geometry,
                                         bias=not stripped, brain_extracted=stripped)
            flair = np.clip(np.rint(phantom.flair), 0, 32767).astype(np.int16)
            image_sha = save_nifti_deterministic(flair, phantom.affine, image_path)
            label_sha = save_nifti_deterministic(phantom.lesions, phantom.affine, label_path)
            brain_mask = (phantom.brain >= 0.5).astype(np.uint8)
            grey_matter = grey_matter_percent(phantom.grey_matter)
            group = f"{geometry}-{orientation}" + ("-brain" if stripped else "")
        else:
            count = int(rng.integers(1, min(max_masks_per_case, len(masks)) + 1))
            chosen = sorted(rng.choice(len(masks), size=count, replace=False).tolist())
            case_host = host_data
            if grey_matter_contrast is not None:
                from planar3d.data.tissue_contrast import scale_grey_matter

                factor = float(np.random.default_rng([seed, i, 2]).uniform(low, high))
                contrast_factors[case_id] = round(factor, 6)
                case_host = scale_grey_matter(host_data, grey_fraction, factor, host_white_matter)
            edge = None if lesion_edge is None else float(np.random.default_rng([seed, i, 3]).uniform(edge_low, edge_high))
            flair, label = inject_lesions(case_host, host_img.affine, [masks[c] for c in chosen], rng, host_label=own,
                                          contrast=lesion_contrast or LESION_CONTRAST, edge_contrast=edge)
            if added_label is not None:
                label = label | added_label.astype(np.uint8)
            if stripped:
                flair, label = np.where(brain, flair, np.float32(0)), label * brain.astype(np.uint8)
            image_sha = save_nifti_deterministic(flair.astype(np.float32), host_img.affine, image_path, code=qcode)
            label_sha = save_nifti_deterministic(label, host_img.affine, label_path, code=qcode)
            group = host_group + ("-brain" if stripped else "")
            brain_mask = None if brain is None else brain.astype(np.uint8)
        if brain_mask is not None:
            affine = phantom.affine if host_data is None else host_img.affine
            make_folder(brain_mask_path(image_path).parent)
            save_nifti_deterministic(brain_mask, affine, brain_mask_path(image_path),
                                     code=1 if host_data is None else qcode)
        if grey_matter is not None:
            affine = phantom.affine if host_data is None else host_img.affine
            make_folder(grey_matter_path(image_path).parent)
            save_nifti_deterministic(grey_matter, affine, grey_matter_path(image_path),
                                     code=1 if host_data is None else qcode)
        entries.append(Case(case_id, image_path.resolve(), label_path.resolve(), group,
                            {"image": image_sha, "label": label_sha}))

    if contrast_factors:
        from planar3d.io import write_json

        write_json(out_dir / GREY_MATTER_CONTRAST_FILE, {"range": [low, high], "factors": contrast_factors})
    n_folds = min(5, cases)
    folds = [[e.id for n, e in enumerate(entries) if n % n_folds == f] for f in range(n_folds)]
    manifest_path = out_dir / "manifest.json"
    save_manifest(Manifest("synthetic", out_dir.resolve(), entries, folds, description), manifest_path)
    return manifest_path
