"""A host's own unlabelled lesions: found in white matter, filled with white matter, nothing else touched."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from planar3d.data.host_lesions import fill_lesions, suspected_lesions
from tests.conftest import shared_data

WM = 100.0


def _ball(shape, centre, radius_vox):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius_vox ** 2


def _host(rng):
    """A 1 mm 'head': white matter (prior 1) inside a cortex shell (prior 0) at 1.2x and dark CSF,
    a lesion at 1.7x in the white matter, a blob as bright in the cortex, and a 3-voxel speck in the
    white matter."""
    shape = (48, 48, 44)
    centre = (24, 24, 22)
    head = _ball(shape, centre, 21)
    brain = _ball(shape, centre, 18)
    white = _ball(shape, centre, 16)
    host = np.where(head, np.float32(0.3 * WM), np.float32(0))
    host[brain] = 1.2 * WM
    host[white] = WM
    host += rng.normal(0, 3, shape).astype(np.float32) * head
    lesion = _ball(shape, (19, 24, 22), 3)            # 123 voxels = 123 mm3
    host[lesion] = 1.7 * WM
    cortex_blob = _ball(shape, (24, 24, 39), 2) & brain & ~white
    host[cortex_blob] = 1.7 * WM
    speck = np.zeros(shape, bool)
    speck[31, 30, 22:25] = True                       # 3 mm3: under the 10 mm3 minimum
    host[speck] = 1.7 * WM
    prior = white.astype(np.float32)
    return host.astype(np.float32), brain, prior, lesion, cortex_blob, speck


def test_a_white_matter_lesion_is_found_and_filled_and_nothing_else_changes():
    rng = np.random.default_rng(0)
    host, brain, prior, lesion, cortex_blob, speck = _host(rng)
    found = suspected_lesions(host, brain, prior, np.eye(4))
    assert found.count == 1
    assert found.mask[lesion].all()                   # the whole lesion, rim included
    assert not found.mask[cortex_blob].any()          # bright, but not white matter by the prior
    assert not found.mask[speck].any()                # too small to tell from noise
    assert found.volume_mm3 == lesion.sum()           # 1 mm voxels; the rim is not counted
    assert abs(float(np.median(found.local_level[brain & (prior > 0)])) - WM) < 3

    filled = fill_lesions(host, found, np.random.default_rng(1))
    assert np.array_equal(filled[~found.mask], host[~found.mask])   # exactly untouched elsewhere
    assert abs(float(filled[lesion].mean()) - WM) < 3                # white matter now
    assert 1.0 < float(filled[lesion].std()) < 15.0                  # with a grain, not a flat patch
    again = fill_lesions(host, found, np.random.default_rng(1))
    assert np.array_equal(filled, again)


def test_a_lesion_free_host_is_left_alone():
    rng = np.random.default_rng(0)
    host, brain, prior, lesion, _, _ = _host(rng)
    host[lesion] = WM
    found = suspected_lesions(host, brain, prior, np.eye(4))
    assert found.count == 0 and not found.mask.any() and found.volume_mm3 == 0
    assert np.array_equal(fill_lesions(host, found, np.random.default_rng(1)), host)


def test_the_rim_is_in_millimetres_on_thick_slices():
    # the same host seen as 1 x 1 x 4 mm voxels: a rim of one voxel would reach into the slices
    # above and below the lesion; the 1.5 mm rim stays within the lesion's own slices
    rng = np.random.default_rng(0)
    host, brain, prior, lesion, _, _ = _host(rng)
    thick = np.diag([1.0, 1.0, 4.0, 1.0])
    found = suspected_lesions(host, brain, prior, thick)
    slices = np.flatnonzero(found.mask.any(axis=(0, 1)))
    lesion_slices = np.flatnonzero(lesion.any(axis=(0, 1)))
    assert set(slices) == set(lesion_slices)


def test_arrays_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="must share one shape"):
        suspected_lesions(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), np.zeros((4, 4, 4)), np.eye(4))


def _mni_host(tmp_path, blob_factor):
    """The ICBM152 T1 at 2 mm as a host in MNI space, with a bright blob in deep white matter."""
    from planar3d.data.atlas import load_mni152

    atlas = load_mni152()
    t1 = np.asarray(atlas.t1.dataobj, dtype=np.float32)[::2, ::2, ::2] * 1000
    wm = np.asarray(atlas.wm.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = atlas.t1.affine.copy()
    affine[:3, :3] *= 2
    deep = np.argwhere(wm > 0.95)
    centre = deep[np.argmin(((deep - deep.mean(0)) ** 2).sum(1))]
    blob = _ball(t1.shape, centre, 2.5)
    t1[blob] = float(np.median(t1[wm > 0.95])) * blob_factor
    path = tmp_path / "mni_host.nii.gz"
    nib.save(nib.Nifti1Image(t1, affine), path)
    return path, blob, affine


@pytest.mark.slow
def test_synth_fills_the_hosts_own_lesion_before_injection(tmp_path, monkeypatch):
    """End to end: a host whose own lesion is unlabelled gets it filled in every case, and says so."""
    import planar3d.data.atlas as atlas
    from planar3d.data.synth import HOST_LESIONS_FILE, write_synthetic_dataset

    host_path, blob, affine = _mni_host(tmp_path, 1.7)
    # the host is in MNI space: the placement is the identity (no registration needed)
    monkeypatch.setattr(atlas, "mni152_placement", lambda *args, **kwargs: (np.eye(4), np.eye(4)))
    host = np.asarray(nib.load(host_path).dataobj)
    runs = {}
    for mode in ("keep", "fill", "label"):
        manifest = write_synthetic_dataset(tmp_path / mode, 2, seed=0, host=host_path,
                                           lesion_masks_dir=shared_data("mslub_mni/lesion_masks"),
                                           template="mni152", host_lesions=mode)
        runs[mode] = json.loads(manifest.read_text())
    assert "host_lesions=fill (1 lesions" in runs["fill"]["description"]
    assert "host_lesions" not in runs["keep"]["description"]
    assert "host_lesions=label (1 lesions" in runs["label"]["description"]
    filled_mask = np.asarray(nib.load(tmp_path / "fill" / HOST_LESIONS_FILE).dataobj) > 0
    labelled_mask = np.asarray(nib.load(tmp_path / "label" / HOST_LESIONS_FILE).dataobj) > 0
    assert filled_mask[blob].all() and labelled_mask[blob].all()
    assert not (labelled_mask & ~filled_mask).any()  # the label is the found lesions, the fill adds a rim (< 1 voxel at 2 mm)
    assert not (tmp_path / "keep" / HOST_LESIONS_FILE).exists()
    for kept, filled in zip(runs["keep"]["cases"], runs["fill"]["cases"]):
        label = np.asarray(nib.load(tmp_path / "fill" / filled["label"]).dataobj) > 0
        assert np.array_equal(label, np.asarray(nib.load(tmp_path / "keep" / kept["label"]).dataobj) > 0)
        image_keep = np.asarray(nib.load(tmp_path / "keep" / kept["image"]).dataobj)
        image_fill = np.asarray(nib.load(tmp_path / "fill" / filled["image"]).dataobj)
        untouched = ~filled_mask & ~label
        assert np.array_equal(image_fill[untouched], image_keep[untouched])  # the same cases otherwise
        outside_label = blob & ~label
        assert image_keep[outside_label].mean() > 1.5 * image_fill[outside_label].mean()  # the blob is gone
    for kept, labelled in zip(runs["keep"]["cases"], runs["label"]["cases"]):
        # label: the same images, the found lesion added to every label
        assert kept["sha256"]["image"] == labelled["sha256"]["image"]
        label_keep = np.asarray(nib.load(tmp_path / "keep" / kept["label"]).dataobj) > 0
        label_label = np.asarray(nib.load(tmp_path / "label" / labelled["label"]).dataobj) > 0
        assert np.array_equal(label_label, label_keep | labelled_mask)
    assert np.array_equal(host, np.asarray(nib.load(host_path).dataobj))  # the host file is never written


def test_synth_fill_needs_the_mni152_template_and_a_known_mode(tmp_path):
    from planar3d.data.synth import write_synthetic_dataset
    from planar3d.errors import InputError

    host_path, _, _ = _mni_host(tmp_path, 1.0)
    masks = shared_data("mslub_mni/lesion_masks")
    for mode in ("fill", "label"):
        with pytest.raises(InputError, match=f"host_lesions '{mode}' needs a host FLAIR and template 'mni152'"):
            write_synthetic_dataset(tmp_path / "a", 1, seed=0, host=host_path, lesion_masks_dir=masks, host_lesions=mode)
    with pytest.raises(InputError, match="host_lesions must be one of keep, fill, label, got 'inpaint'"):
        write_synthetic_dataset(tmp_path / "b", 1, seed=0, host=host_path, lesion_masks_dir=masks, template="mni152",
                                host_lesions="inpaint")
