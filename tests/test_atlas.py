"""nilearn's ICBM152 templates: loaded offline, registered onto a real host, priors mapped into it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from planar3d.data.atlas import MNI152, grey_matter_prior_in_host, load_mni152, prior_in_host, register_mni152_to_host
from planar3d.preprocess import otsu_threshold
from tests.conftest import shared_data


def test_templates_are_bundled_1mm_on_one_grid():
    atlas = load_mni152()
    images = (atlas.t1, atlas.gm, atlas.wm, atlas.brain_mask)
    for image in images:
        assert image.shape == (197, 233, 189)
        assert np.array_equal(image.affine, atlas.t1.affine)
        assert np.allclose(image.header.get_zooms()[:3], 1.0)
    t1, mask = np.asarray(atlas.t1.dataobj), np.asarray(atlas.brain_mask.dataobj)
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert not (t1[mask == 0] > 0).any()  # brain-extracted: a usable registration template
    for prior in (atlas.gm, atlas.wm):
        data = np.asarray(prior.dataobj)
        assert data.min() >= 0 and data.max() <= 1


def test_mni152_name_reads_the_nilearn_t1():
    from planar3d.data.synth import read_template

    data, image = read_template(MNI152)
    assert np.array_equal(data, np.asarray(load_mni152().t1.dataobj))


def downsampled_real_head(factor: int = 4) -> nib.Nifti1Image:
    """The real 1 mm FLAIR head at 4 mm (every fourth voxel), to keep registration short."""
    image = nib.load(shared_data("real/flair_head_1mm.nii.gz"))
    data = np.asarray(image.dataobj, dtype=np.float32)[::factor, ::factor, ::factor]
    affine = image.affine.copy()
    affine[:3, :3] *= factor
    return nib.Nifti1Image(data, affine)


@pytest.mark.slow
def test_mni_template_registers_onto_a_real_host_and_priors_land_in_its_head():
    host = downsampled_real_head()
    host_to_mni = register_mni152_to_host(host)
    atlas = load_mni152()
    brain = prior_in_host(atlas.brain_mask, host, host_to_mni) > 0.5
    voxel_ml = abs(np.linalg.det(host.affine[:3, :3])) / 1000
    assert 900 < brain.sum() * voxel_ml < 2000  # an adult brain, in ml
    data = np.asarray(host.dataobj)
    not_air = data > 0.1 * otsu_threshold(data)  # FLAIR's CSF is dark but not air
    assert (brain & not_air).sum() / brain.sum() > 0.98  # the mapped brain lies in the host's head (99.7 % measured)
    grey = grey_matter_prior_in_host(host, host_to_mni)
    assert grey.shape == host.shape and grey.min() >= 0 and grey.max() <= 1
    # grey matter sits on the brain's rim (cortex): more of it near the edge than deep inside
    from scipy import ndimage

    inner = ndimage.binary_erosion(brain, iterations=3)
    rim = brain & ~inner
    assert grey[rim].mean() > grey[inner].mean()


def test_without_scaling_keeps_rotation_translation_and_the_centre():
    from planar3d.data.atlas import without_scaling

    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.2, 1.1, 1.3])
    matrix[:3, 3] = [4.0, -3.0, 2.0]
    centre = np.array([10.0, 20.0, -5.0])
    rigid = without_scaling(matrix, centre)
    np.testing.assert_allclose(rigid[:3, :3], rotation, atol=1e-12)
    np.testing.assert_allclose(rigid @ np.r_[centre, 1], matrix @ np.r_[centre, 1], atol=1e-12)


@pytest.mark.slow
def test_synth_with_mni152_template_places_real_masks_in_a_real_host(tmp_path):
    """`synth --template mni152` end to end on the real head (at 4 mm) with the real MSLUB masks."""
    from planar3d.data.synth import write_synthetic_dataset

    host_path = tmp_path / "host.nii.gz"
    nib.save(downsampled_real_head(), host_path)
    manifest = write_synthetic_dataset(tmp_path / "out", 2, seed=0, host=host_path,
                                       lesion_masks_dir=shared_data("mslub_mni/lesion_masks"), template=MNI152,
                                       brain_extracted=0.5)
    import json

    cases = json.loads(manifest.read_text())["cases"]
    assert "template=mni152" in json.loads(manifest.read_text())["description"]
    for case in cases:
        label = np.asarray(nib.load(manifest.parent / case["label"]).dataobj)
        assert label.sum() > 0  # lesions landed in the host


def _placed(up_mm: float = 0.0, back_mm: float = 0.0, scale: float = 1.0) -> np.ndarray:
    matrix = np.diag([scale, scale, scale, 1.0])
    matrix[1, 3], matrix[2, 3] = back_mm, up_mm
    return matrix


@pytest.mark.parametrize("fit, refusal", [
    # the failure of the far-off 3.3 mm host (template placed below the scan), made on purpose:
    # host world -> MNI world 12 cm up, the host's grid sees the bottom of the brain at most
    (_placed(up_mm=120.0), r"only \d+% of the template's brain lies inside this scan"),
    # the right size (the real head's brain is within 1.2x of the template's) moved 6 cm: most of
    # the brain is still in the scan, 30 % of it on air
    (_placed(back_mm=60.0, scale=1.2), r"\d+% of the template's brain lies on air in this scan"),
])
def test_synth_refuses_a_registration_that_puts_the_brain_out_of_the_head(tmp_path, monkeypatch, fit, refusal):
    import planar3d.data.atlas as atlas
    from planar3d.data.synth import write_synthetic_dataset
    from planar3d.errors import InputError

    monkeypatch.setattr(atlas, "mni152_placement", lambda *args, **kwargs: (fit, fit))
    host_path = tmp_path / "host.nii.gz"
    nib.save(downsampled_real_head(), host_path)
    with pytest.raises(InputError, match=r"host.nii.gz: after registration to mni152 " + refusal):
        write_synthetic_dataset(tmp_path / "out", 1, seed=0, host=host_path,
                                lesion_masks_dir=shared_data("mslub_mni/lesion_masks"), template=MNI152)
