"""How far `synth --template mni152` places the MSLUB lesion masks from where they belong.

patient26 is used as the *host* here only because its lesion masks' world is its own, so the
correct host-to-masks map is the identity; it is no template and no training data. Prints the
median and 90th percentile displacement (mm) of the lesion voxels of every mask through the full
template affine and through the rigid part used by `mni152_placement`.

    PYTHONPATH=. python benchmarks/check_mni152_placement.py [../shared/data/mslub_mni]
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def main(folder: Path) -> None:
    from planar3d.data.atlas import mni152_placement

    host = nib.load(folder / "patient26_flair.nii.gz")
    full, rigid = mni152_placement(host)
    masks = sorted((folder / "lesion_masks").glob("*.nii.gz")) + [folder / "patient26_lesions.nii.gz"]
    voxels = np.concatenate([np.argwhere(np.asarray(nib.load(m).dataobj) > 0) for m in masks])
    world = nib.affines.apply_affine(host.affine, voxels)
    scales = np.linalg.svd(full[:3, :3], compute_uv=False)
    print(f"template affine scales {np.round(scales, 3).tolist()}; {len(voxels)} lesion voxels of {len(masks)} masks")
    for name, matrix in (("full affine", full), ("rigid part (used)", rigid)):
        placed = nib.affines.apply_affine(np.linalg.inv(matrix), world)  # host point each mask voxel goes to
        error = np.linalg.norm(placed - world, axis=1)
        print(f"{name}: median {np.median(error):.1f} mm, 90th percentile {np.percentile(error, 90):.1f} mm")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mslub_mni"))
