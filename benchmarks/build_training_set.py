"""Build a multi-host training set: lesions injected into every real unlabelled FLAIR, plus phantoms.

Why: a training set made from one host scan teaches one head, one scanner and one contrast, and
its validation cases (same head) reward over-segmentation (issue 9). Here every real unlabelled
FLAIR of ``../shared/data/real/`` (five heads, five acquisition settings) gets real MSLUB lesion
masks injected (``planar3d synth --host``), phantoms are added, and everything is merged into one
manifest (``planar3d manifest merge``). Each injected case's group is rewritten to
``host-<host file stem>-<axcodes>[-brain]`` so that :func:`planar3d.data.hosts.host_key` knows
its host exactly.

patient26 (``../shared/data/mslub_mni/patient26_*``) is the real test patient: it is used in no
role. Its files are refused as hosts or template, and a lesion-mask folder holding
``patient26_*`` is replaced by a folder of links to the other masks.

The masks are placed through a registration of the MNI152 template (nilearn's ICBM152 2009a,
``--template mni152``, the default) to each host. If the installed ``planar3d synth`` does not
support ``--template mni152`` the script stops with that message; ``--template PATH`` passes a
brain-extracted image in the masks' MNI space instead (never patient26).

Leave-one-host-out (``--leave-out HOST``): the training set is built without HOST, and a test set
of HOST is drawn from a pool of injected cases: ``--test-cases`` light-load cases (lesions
< 0.2 % of the brain) and as many heavy-load ones (>= 1 %). The load is the lesion volume over
the MNI152 brain-mask volume (the affine registration scales lesions with the head, so this is
the load relative to the host's brain up to the head-size difference between host and template).

Usage:
    python benchmarks/build_training_set.py --out DIR [--cases-per-host 8] [--phantoms 16] [--seed 0]
        [--hosts NAME,NAME] [--leave-out HOST --test-cases 3 --test-pool 24]
        [--template mni152|PATH] [--brain-extracted 0.3] [--phantom-size full] [--dry-run]

Outputs: ``DIR/parts/<part>/`` (one ``planar3d synth`` folder per host and for the phantoms),
``DIR/train_manifest.json``, with ``--leave-out`` ``DIR/test_manifest.json``, and
``DIR/build.json`` (hosts, seeds, template, lesion loads of the test pool).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

FORBIDDEN = "patient26"
LIGHT_MAX = 0.002   # lesion load below which a test case is "light" (issue 9: < 0.2 % of the brain)
HEAVY_MIN = 0.01    # lesion load from which a test case is "heavy"
PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT.parent / "shared" / "data"


def run_cli(args: Sequence[str], dry_run: bool = False) -> str:
    """Run ``python -m <cli> ARGS``; its stdout, or stop with its last error line."""
    command = [sys.executable, "-m", "pipelines.cli", *[str(a) for a in args]]
    print("$ planar3d " + " ".join(str(a) for a in args), flush=True)
    if dry_run:
        return ""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no message)"]
        raise SystemExit(f"planar3d {args[0]} failed (exit {result.returncode}): {lines[-1]}")
    return result.stdout


def refuse_patient26(paths: Sequence[Path], role: str) -> None:
    """Stop if any path names patient26 (the held-out real test patient)."""
    for path in paths:
        if FORBIDDEN in Path(path).name or FORBIDDEN in str(Path(path).resolve()):
            raise SystemExit(f"{path}: patient26 is the held-out test patient and is never used as {role}")


def host_name(path: Path) -> str:
    """A host's name: its file name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_hosts(real_dir: Path, only: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """``{name: path}`` of the FLAIRs in ``real_dir`` (sorted), optionally only the named ones."""
    paths = sorted(p for p in Path(real_dir).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    refuse_patient26(paths, "a host")
    hosts = {host_name(p): p for p in paths}
    if only:
        unknown = sorted(set(only) - set(hosts))
        if unknown:
            raise SystemExit(f"unknown host(s) {', '.join(unknown)}; available: {', '.join(hosts)}")
        hosts = {name: hosts[name] for name in only}
    if not hosts:
        raise SystemExit(f"{real_dir}: no .nii/.nii.gz host FLAIR")
    return hosts


def checked_masks_dir(masks_dir: Path, out: Path) -> Tuple[Path, List[str]]:
    """``(folder to inject from, mask file names)`` with any ``patient26_*`` mask left out.

    The shared folder holds other patients only; should a patient26 mask appear there, a folder
    of links to the other masks is made under ``out`` instead.
    """
    files = sorted(p for p in Path(masks_dir).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    kept = [p for p in files if FORBIDDEN not in p.name]
    if not kept:
        raise SystemExit(f"{masks_dir}: no lesion mask other than patient26")
    if len(kept) == len(files):
        return Path(masks_dir), [p.name for p in kept]
    linked = out / "lesion_masks_without_patient26"
    linked.mkdir(parents=True, exist_ok=True)
    for p in kept:
        if not (linked / p.name).exists():
            (linked / p.name).symlink_to(p.resolve())
    return linked, [p.name for p in kept]


def check_template(template: str, dry_run: bool) -> None:
    """Stop unless ``template`` is a usable file or ``mni152`` is supported by ``planar3d synth``."""
    if template == "mni152":
        if not dry_run and "mni152" not in run_cli(["synth", "--help"]):
            raise SystemExit("planar3d synth does not support --template mni152 yet; pass --template PATH to a "
                             "brain-extracted image in the lesion masks' MNI space (never patient26)")
        return
    refuse_patient26([Path(template)], "a registration template")
    if not Path(template).is_file():
        raise SystemExit(f"{template}: template file not found")


def relabel_part(manifest_path: Path, dataset: str, host: Optional[str], keep: Optional[Sequence[str]] = None) -> None:
    """Rename a synth manifest's data set (merged ids become ``<dataset>_<id>``), record the host
    in each injected case's group (``host-<host>-<axcodes>[-brain]``), optionally keep only ``keep``."""
    from planar3d.io import write_json

    data = json.loads(Path(manifest_path).read_text())
    data["dataset"] = dataset
    if keep is not None:
        data["cases"] = [c for c in data["cases"] if c["id"] in set(keep)]
        data["folds"] = [[c["id"] for c in data["cases"]]]
    if host is not None:
        for case in data["cases"]:
            group = case.get("group") or ""
            if group.startswith("host-") and not group.startswith(f"host-{host}-"):
                case["group"] = f"host-{host}-" + group[len("host-"):]
    write_json(manifest_path, data)


def mni_brain_mm3() -> float:
    """Volume (mm³) of nilearn's MNI152 brain mask: the brain the lesion loads are relative to."""
    import numpy as np
    from nilearn.datasets import load_mni152_brain_mask

    mask = load_mni152_brain_mask()
    return float(np.count_nonzero(mask.get_fdata() > 0) * abs(np.linalg.det(mask.affine[:3, :3])))


def lesion_load(label_path: Path, brain_mm3: float) -> float:
    """Lesion volume of a label file over ``brain_mm3``."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(label_path))
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    return float(np.count_nonzero(np.asanyarray(image.dataobj) > 0) * voxel / brain_mm3)


def select_by_load(loads: Dict[str, float], count: int) -> Tuple[List[str], List[str]]:
    """``(light, heavy)``: up to ``count`` ids each, light = load < LIGHT_MAX, heavy = load >= HEAVY_MIN,
    in id order; stops if either kind is missing."""
    light = sorted(i for i, v in loads.items() if v < LIGHT_MAX)[:count]
    heavy = sorted(i for i, v in loads.items() if v >= HEAVY_MIN)[:count]
    if not light or not heavy:
        raise SystemExit(f"the test pool has {len(light)} light (< {LIGHT_MAX:.1%}) and {len(heavy)} heavy "
                         f"(>= {HEAVY_MIN:.0%}) case(s); a larger --test-pool or another --seed is needed")
    return light, heavy


def synth_host(out: Path, host: Path, masks: Path, cases: int, seed: int, args, dry_run: bool) -> Path:
    run_cli(["synth", "--out", out, "--cases", cases, "--seed", seed, "--host", host, "--lesion-masks", masks,
             "--template", args.template, "--brain-extracted", args.brain_extracted], dry_run)
    return out / "manifest.json"


def build(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hosts = find_hosts(args.real_dir, [h for h in args.hosts.split(",") if h] if args.hosts else None)
    if args.leave_out is not None and args.leave_out not in hosts:
        raise SystemExit(f"--leave-out {args.leave_out}: not a host; hosts: {', '.join(hosts)}")
    masks, mask_names = checked_masks_dir(args.lesion_masks, out)
    check_template(args.template, args.dry_run)
    record: dict = {"hosts": {}, "masks": mask_names, "template": args.template, "leave_out": args.leave_out,
                    "seed": args.seed, "cli": "pipelines.cli"}
    parts = []
    for index, (name, path) in enumerate(hosts.items()):
        if name == args.leave_out:
            continue
        seed = args.seed + 101 * (index + 1)
        manifest = synth_host(out / "parts" / f"host_{name}", path, masks, args.cases_per_host, seed, args, args.dry_run)
        if not args.dry_run:
            relabel_part(manifest, name, name)
        record["hosts"][name] = {"path": str(path), "cases": args.cases_per_host, "seed": seed}
        parts.append(manifest)
    if args.phantoms:
        phantoms = out / "parts" / "phantoms"
        run_cli(["synth", "--out", phantoms, "--cases", args.phantoms, "--seed", args.seed, "--size", args.phantom_size,
                 "--brain-extracted", args.brain_extracted], args.dry_run)
        if not args.dry_run:
            relabel_part(phantoms / "manifest.json", "phantoms", None)
        parts.append(phantoms / "manifest.json")
        record["phantoms"] = {"cases": args.phantoms, "seed": args.seed, "size": args.phantom_size}
    if not parts:
        raise SystemExit("nothing to train on: no host left and no phantoms")
    run_cli(["manifest", "merge", *parts, "--out", out / "train_manifest.json", "--dataset", "train"], args.dry_run)

    if args.leave_out is not None:
        name = args.leave_out
        part = out / "parts" / f"test_{name}"
        seed = args.seed + 7919
        manifest = synth_host(part, hosts[name], masks, args.test_pool, seed, args, args.dry_run)
        if not args.dry_run:
            brain = mni_brain_mm3()
            cases = json.loads(manifest.read_text())["cases"]
            loads = {c["id"]: lesion_load(part / c["label"], brain) for c in cases}
            light, heavy = select_by_load(loads, args.test_cases)
            relabel_part(manifest, f"test_{name}", name, keep=light + heavy)
            record["test"] = {"host": name, "pool": args.test_pool, "seed": seed, "loads": loads,
                              "light": light, "heavy": heavy, "brain_mm3": brain}
        run_cli(["manifest", "merge", manifest, "--out", out / "test_manifest.json", "--dataset", "test"], args.dry_run)
    if not args.dry_run:
        from planar3d.io import write_json

        write_json(out / "build.json", record)
    return record


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--real-dir", type=Path, default=DATA / "real")
    parser.add_argument("--lesion-masks", type=Path, default=DATA / "mslub_mni" / "lesion_masks")
    parser.add_argument("--hosts", default="", help="comma-separated host names (default: every FLAIR in --real-dir)")
    parser.add_argument("--cases-per-host", type=int, default=8)
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--phantom-size", default="full", choices=("small", "full"))
    parser.add_argument("--brain-extracted", type=float, default=0.3, help="fraction of cases written skull-stripped")
    parser.add_argument("--template", default="mni152", help="'mni152' (nilearn, via synth) or a template file (never patient26)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leave-out", default=None, help="host left out of training; its test set is written")
    parser.add_argument("--test-cases", type=int, default=3, help="light and heavy test cases each (with --leave-out)")
    parser.add_argument("--test-pool", type=int, default=24, help="injected cases drawn to choose the test cases from")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for name in ("cases_per_host", "test_cases", "test_pool"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.phantoms < 0:
        parser.error("--phantoms must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    record = build(parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "test"}, indent=1, allow_nan=False)[:2000])
    if "test" in record:
        print(f"test set of {record['test']['host']}: light {record['test']['light']}, heavy {record['test']['heavy']}")


if __name__ == "__main__":
    main()
