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

Light-load cases (``--light-cases-per-host``, default 3): each host also gets cases with one light
mask each (below 0.2 % of the MNI152 brain), so that validation on a held-out host also meets
scans with few lesions, where false positives dominate (issue 9).

The hosts' own lesions (``--host-lesions``, default ``fill``): four of the five real hosts are MS
patients whose lesions are not labelled; each training host's bright white-matter blobs are filled
with white matter before injection (:mod:`planar3d.data.host_lesions`), so that no real lesion is
trained as background. A ``--leave-out`` host's test cases keep theirs: that is what a new scan
looks like. Measured in docs/training.md, "Issue 9, ninth session".

Leave-one-host-out (``--leave-out HOST``): the training set is built without HOST, and a test set
of HOST is made of ``--test-cases`` heavy-load cases (lesions >= 1 % of the brain), drawn from a
pool of ``--test-pool`` injected cases (1-4 masks each), and as many light-load ones (< 0.2 %),
drawn from a second pool in which each case gets one of the light masks (a mask's own load on
the MNI152 brain below 0.2 %: 8 of the 27), since 1-4 masks of any size almost never make a
light case (the first build's pool of 24 held none). A case's load is
:func:`planar3d.data.synth.case_lesion_load` (its lesions over its brain mask), the same that
``benchmarks/score_cases.py`` reports.

Usage:
    python benchmarks/build_training_set.py --out DIR [--cases-per-host 8] [--phantoms 16] [--seed 0]
        [--hosts NAME,NAME] [--light-cases-per-host 3] [--leave-out HOST --test-cases 3 --test-pool 24]
        [--template mni152|PATH] [--brain-extracted 0.3] [--phantom-size full] [--host-lesions fill|keep]
        [--grey-matter-contrast LOW,HIGH] [--lesion-contrast LOW,HIGH] [--dry-run]

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
    return link_folder(out / "lesion_masks_without_patient26", kept), [p.name for p in kept]


def link_folder(folder: Path, files: Sequence[Path]) -> Path:
    """``folder`` holding a link to each of ``files`` (made once; existing links are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(Path(path).resolve())
    return folder


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


def light_masks_dir(masks_dir: Path, names: Sequence[str], out: Path) -> Tuple[Path, List[str]]:
    """A folder of links to the masks whose own load on the MNI152 brain is light (< 0.2 %)."""
    from planar3d.data.synth import LIGHT_LOAD_MAX

    brain = mni_brain_mm3()
    light = [name for name in names if lesion_load(Path(masks_dir) / name, brain) < LIGHT_LOAD_MAX]
    if not light:
        raise SystemExit(f"{masks_dir}: no lesion mask lighter than {LIGHT_LOAD_MAX:.1%} of the MNI152 brain")
    return link_folder(out / "lesion_masks_light", [Path(masks_dir) / name for name in light]), light


def select_by_load(loads: Dict[str, float], count: int, kind: str) -> List[str]:
    """Up to ``count`` ids of ``kind`` ("light": load < 0.2 %, "heavy": load >= 1 %), in id order;
    stops if there is none."""
    from planar3d.data.synth import HEAVY_LOAD_MIN, LIGHT_LOAD_MAX

    if kind == "light":
        chosen = sorted(i for i, v in loads.items() if v < LIGHT_LOAD_MAX)[:count]
    else:
        chosen = sorted(i for i, v in loads.items() if v >= HEAVY_LOAD_MIN)[:count]
    if not chosen:
        bound = f"< {LIGHT_LOAD_MAX:.1%}" if kind == "light" else f">= {HEAVY_LOAD_MIN:.0%}"
        raise SystemExit(f"the test pool has no {kind} ({bound}) case; a larger --test-pool or another --seed is needed")
    return chosen


def case_loads(manifest: Path) -> Dict[str, float]:
    """``{case id: lesion load}`` of a synth part (:func:`planar3d.data.synth.case_lesion_load`)."""
    from planar3d.data.synth import case_lesion_load

    return {c["id"]: case_lesion_load(manifest.parent / c["image"], manifest.parent / c["label"])
            for c in json.loads(manifest.read_text())["cases"]}


def synth_host(out: Path, host: Path, masks: Path, cases: int, seed: int, args, dry_run: bool, max_masks: int = 4,
               host_lesions: str = "keep", grey_matter_contrast: Optional[Tuple[float, float]] = None,
               lesion_contrast: Optional[Tuple[float, float]] = None,
               lesion_edge: Optional[Tuple[float, float]] = None) -> Path:
    run_cli(["synth", "--out", out, "--cases", cases, "--seed", seed, "--host", host, "--lesion-masks", masks,
             "--template", args.template, "--brain-extracted", args.brain_extracted]
            + (["--max-masks-per-case", max_masks] if max_masks != 4 else [])
            + (["--host-lesions", host_lesions] if host_lesions != "keep" else [])
            + (["--grey-matter-contrast", *grey_matter_contrast] if grey_matter_contrast else [])
            + (["--lesion-contrast", *lesion_contrast] if lesion_contrast else [])
            + (["--lesion-edge", *lesion_edge] if lesion_edge else []), dry_run)
    return out / "manifest.json"


def build(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hosts = find_hosts(args.real_dir, [h for h in args.hosts.split(",") if h] if args.hosts else None)
    if args.leave_out is not None and args.leave_out not in hosts:
        raise SystemExit(f"--leave-out {args.leave_out}: not a host; hosts: {', '.join(hosts)}")
    masks, mask_names = checked_masks_dir(args.lesion_masks, out)
    check_template(args.template, args.dry_run)
    if args.grey_matter_contrast and args.template != "mni152":
        raise SystemExit("--grey-matter-contrast needs --template mni152 (its grey-matter prior)")
    if args.host_lesions == "fill" and args.template != "mni152":
        raise SystemExit("--host-lesions fill needs --template mni152 (its white-matter prior); "
                         "pass --host-lesions keep with another template")
    record: dict = {"hosts": {}, "masks": mask_names, "template": args.template, "leave_out": args.leave_out,
                    "host_lesions": args.host_lesions, "grey_matter_contrast": args.grey_matter_contrast,
                    "lesion_contrast": args.lesion_contrast, "lesion_edge": args.lesion_edge,
                    "seed": args.seed, "cli": "pipelines.cli"}
    parts = []
    needs_light = args.light_cases_per_host > 0 or args.leave_out is not None
    light_masks, light_names = light_masks_dir(masks, mask_names, out) if needs_light else (None, [])
    for index, (name, path) in enumerate(hosts.items()):
        if name == args.leave_out:
            continue
        seed = args.seed + 101 * (index + 1)
        manifest = synth_host(out / "parts" / f"host_{name}", path, masks, args.cases_per_host, seed, args, args.dry_run,
                              host_lesions=args.host_lesions, grey_matter_contrast=args.grey_matter_contrast,
                              lesion_contrast=args.lesion_contrast, lesion_edge=args.lesion_edge)
        if not args.dry_run:
            relabel_part(manifest, name, name)
        record["hosts"][name] = {"path": str(path), "cases": args.cases_per_host, "seed": seed}
        parts.append(manifest)
        if args.light_cases_per_host:
            # light-load cases of the same host (one light mask each): validation on a held-out
            # host then also scores its false positives on scans with few lesions
            light = synth_host(out / "parts" / f"host_{name}_light", path, light_masks, args.light_cases_per_host,
                               seed + 50, args, args.dry_run, max_masks=1, host_lesions=args.host_lesions,
                               grey_matter_contrast=args.grey_matter_contrast, lesion_contrast=args.lesion_contrast,
                               lesion_edge=args.lesion_edge)
            if not args.dry_run:
                relabel_part(light, f"{name}_light", name)
            record["hosts"][name]["light"] = {"cases": args.light_cases_per_host, "seed": seed + 50, "masks": light_names}
            parts.append(light)
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
        # heavy cases from a pool like the training cases (the seed of the first builds, so their
        # heavy test cases stay the same), light ones from a pool with one light mask per case
        part = out / "parts" / f"test_{name}"
        seed = args.seed + 7919
        manifest = synth_host(part, hosts[name], masks, args.test_pool, seed, args, args.dry_run)
        light_part = out / "parts" / f"test_{name}_light"
        light_manifest = synth_host(light_part, hosts[name], light_masks, args.test_pool, seed + 1, args, args.dry_run,
                                    max_masks=1)
        if not args.dry_run:
            loads, light_loads = case_loads(manifest), case_loads(light_manifest)
            heavy, light = select_by_load(loads, args.test_cases, "heavy"), select_by_load(light_loads, args.test_cases, "light")
            relabel_part(manifest, f"test_{name}", name, keep=heavy)
            relabel_part(light_manifest, f"test_{name}_light", name, keep=light)
            record["test"] = {"host": name, "pool": args.test_pool, "seed": seed, "loads": loads, "heavy": heavy,
                              "light_pool": {"seed": seed + 1, "masks": light_names, "loads": light_loads}, "light": light}
        run_cli(["manifest", "merge", manifest, light_manifest, "--out", out / "test_manifest.json", "--dataset", "test"],
                args.dry_run)
    if not args.dry_run:
        from planar3d.io import write_json

        write_json(out / "build.json", record)
    return record


def _number_pair(text: str) -> Tuple[float, float]:
    """``"LOW,HIGH"`` -> ``(low, high)`` floats, else an argparse error."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


def _contrast_range(text: str) -> Tuple[float, float]:
    """``"LOW,HIGH"`` -> ``(low, high)`` with ``0 < low <= high``."""
    low, high = _number_pair(text)
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def _share_range(text: str) -> Tuple[float, float]:
    """``"LOW,HIGH"`` -> ``(low, high)`` with ``0 <= low <= high <= 1``."""
    low, high = _number_pair(text)
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH <= 1, got {text!r}")
    return low, high


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--real-dir", type=Path, default=DATA / "real")
    parser.add_argument("--lesion-masks", type=Path, default=DATA / "mslub_mni" / "lesion_masks")
    parser.add_argument("--hosts", default="", help="comma-separated host names (default: every FLAIR in --real-dir)")
    parser.add_argument("--cases-per-host", type=int, default=8)
    parser.add_argument("--light-cases-per-host", type=int, default=3,
                        help="extra cases per host with one light mask each (< 0.2 %% of the MNI152 brain; 0: none, "
                             "as in the builds before 2026-11-26's fourth session)")
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--phantom-size", default="full", choices=("small", "full"))
    parser.add_argument("--brain-extracted", type=float, default=0.3, help="fraction of cases written skull-stripped")
    parser.add_argument("--template", default="mni152", help="'mni152' (nilearn, via synth) or a template file (never patient26)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-lesions", default="fill", choices=("keep", "fill"),
                        help="training hosts' own unlabelled lesions: fill them with white matter (the default, needs "
                             "--template mni152; planar3d synth --host-lesions) or keep them as background (the builds "
                             "before 2026-11-27's ninth session); a --leave-out host's test cases keep theirs")
    parser.add_argument("--grey-matter-contrast", default=None, type=_contrast_range, metavar="LOW,HIGH",
                        help="training hosts' grey matter scaled per case by a factor drawn in [LOW, HIGH] (planar3d "
                             "synth --grey-matter-contrast; needs --template mni152); test cases keep the host's own")
    parser.add_argument("--lesion-contrast", default=None, type=_contrast_range, metavar="LOW,HIGH",
                        help="training hosts' injected lesions at a level drawn in [LOW, HIGH] times white matter "
                             "(planar3d synth --lesion-contrast; default 1.3,1.8); test cases keep the default")
    parser.add_argument("--lesion-edge", default=None, type=_share_range, metavar="LOW,HIGH",
                        help="training hosts' injected lesions graded, their edges at a share of the lesion's contrast "
                             "drawn in [LOW, HIGH] (planar3d synth --lesion-edge; default flat); test cases stay flat")
    parser.add_argument("--leave-out", default=None, help="host left out of training; its test set is written")
    parser.add_argument("--test-cases", type=int, default=3, help="light and heavy test cases each (with --leave-out)")
    parser.add_argument("--test-pool", type=int, default=24, help="injected cases drawn to choose each kind of test case from")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for name in ("cases_per_host", "test_cases", "test_pool"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("phantoms", "light_cases_per_host"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    record = build(parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "test"}, indent=1, allow_nan=False)[:2000])
    if "test" in record:
        print(f"test set of {record['test']['host']}: light {record['test']['light']}, heavy {record['test']['heavy']}")


if __name__ == "__main__":
    main()
