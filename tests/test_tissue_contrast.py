"""Grey/white contrast varied per injected case: exact scaling, nothing else touched, recorded."""

from __future__ import annotations

import doctest
import json

import nibabel as nib
import numpy as np
import pytest

import planar3d.data.tissue_contrast as tissue_contrast
from planar3d.data.tissue_contrast import scale_grey_matter
from planar3d.errors import InputError
from tests.conftest import shared_data
from tests.test_host_lesions import _mni_host


def test_examples():
    assert doctest.testmod(tissue_contrast).failed == 0


def test_grey_matter_is_scaled_white_matter_and_csf_are_not():
    white_matter = 200.0
    host = np.array([200.0, 240.0, 240.0, 100.0, 140.0, 0.0], np.float32)
    grey = np.array([0.0, 1.0, 0.25, 1.0, 1.0, 1.0], np.float32)
    out = scale_grey_matter(host, grey, 1.2, white_matter)
    # white matter (prior 0), CSF (0.5x white matter: below the ramp) and air keep their values exactly
    assert out[0] == 200.0 and out[3] == 100.0 and out[5] == 0.0
    assert out[1] == np.float32(240.0) * np.float32(1.2)
    assert out[2] == np.float32(240.0) * (1 + np.float32(0.2) * np.float32(0.25))
    assert out[4] == pytest.approx(140.0 * 1.1, rel=1e-6)  # 0.7x white matter: half-way up the ramp
    assert out.dtype == np.float32
    assert np.array_equal(scale_grey_matter(host, grey, 1.0, white_matter), host)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="shape"):
        scale_grey_matter(np.zeros(3), np.zeros(4), 1.1, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        scale_grey_matter(np.zeros(3), np.zeros(3), 0.0, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        scale_grey_matter(np.zeros(3), np.zeros(3), 1.1, 0.0)


@pytest.mark.slow
def test_synth_scales_each_cases_grey_matter_and_writes_its_grey_matter_map(tmp_path, monkeypatch):
    import planar3d.data.atlas as atlas
    from planar3d.data.synth import GREY_MATTER_CONTRAST_FILE, brain_mask_path, grey_matter_path, write_synthetic_dataset
    from planar3d.preprocess import white_matter_level

    host_path, _, _ = _mni_host(tmp_path, 1.0)
    # the host is the template at 2 mm in MNI space: the placement is the identity
    monkeypatch.setattr(atlas, "mni152_placement", lambda *args, **kwargs: (np.eye(4), np.eye(4)))
    masks = shared_data("mslub_mni/lesion_masks")
    plain = write_synthetic_dataset(tmp_path / "plain", 3, seed=0, host=host_path, lesion_masks_dir=masks, template="mni152")
    varied = write_synthetic_dataset(tmp_path / "varied", 3, seed=0, host=host_path, lesion_masks_dir=masks,
                                     template="mni152", grey_matter_contrast=(0.9, 1.2))
    factors = json.loads((tmp_path / "varied" / GREY_MATTER_CONTRAST_FILE).read_text())
    assert factors["range"] == [0.9, 1.2] and len(factors["factors"]) == 3
    assert all(0.9 <= f <= 1.2 for f in factors["factors"].values())
    assert "grey_matter_contrast=0.9-1.2" in json.loads(varied.read_text())["description"]
    host = np.asarray(nib.load(host_path).dataobj, dtype=np.float32)
    template_grey = np.asarray(atlas.load_mni152().gm.dataobj)[::2, ::2, ::2]
    for before, after in zip(json.loads(plain.read_text())["cases"], json.loads(varied.read_text())["cases"]):
        image = tmp_path / "varied" / after["image"]
        brain = np.asarray(nib.load(brain_mask_path(image)).dataobj) > 0
        grey = np.asarray(nib.load(grey_matter_path(image)).dataobj)
        # the sidecar is the template's grey matter at the host's voxels, in percent, inside the brain
        assert np.abs(grey.astype(int) - np.rint(template_grey * 100 * brain).astype(int)).max() <= 1
        label = np.asarray(nib.load(tmp_path / "varied" / after["label"]).dataobj) > 0
        plain_label = np.asarray(nib.load(tmp_path / "plain" / before["label"]).dataobj) > 0
        # the same lesions in the same places; only the head mask they are clipped to (from the
        # host's intensities) may move by a voxel at the head's edge
        assert np.count_nonzero(label ^ plain_label) <= 0.01 * np.count_nonzero(plain_label)
        plain_image = np.asarray(nib.load(tmp_path / "plain" / before["image"]).dataobj)
        varied_image = np.asarray(nib.load(image).dataobj)
        expected = scale_grey_matter(host, template_grey * brain, factors["factors"][after["id"]], white_matter_level(host)[0])
        outside = ~label
        assert np.allclose(varied_image[outside], expected[outside], rtol=1e-5, atol=1e-3)
        assert np.array_equal(plain_image[outside & (template_grey == 0)], host[outside & (template_grey == 0)])


def test_synth_grey_matter_contrast_needs_a_host_and_the_mni152_template(tmp_path):
    from planar3d.data.synth import write_synthetic_dataset

    with pytest.raises(InputError, match="grey_matter_contrast needs a host FLAIR"):
        write_synthetic_dataset(tmp_path / "a", 1, seed=0, grey_matter_contrast=(0.9, 1.1))
    with pytest.raises(InputError, match="0 < low <= high"):
        write_synthetic_dataset(tmp_path / "b", 1, seed=0, host=shared_data("real/flair_head_1mm.nii.gz"),
                                lesion_masks_dir=shared_data("mslub_mni/lesion_masks"), template="mni152",
                                grey_matter_contrast=(1.2, 1.1))
