#!/usr/bin/env bash
# Build the planar3d image and run it the way users do; compare with the same commands on the host.
#
#   sudo PYTHON=/path/to/venv/bin/python bash scripts/container_check.sh [SCRATCH]
#
# Needs root, Debian/Ubuntu apt and a few minutes (not part of CI). PYTHON is a host interpreter
# with planar3d's dependencies (`bash scripts/install.sh`); this checkout is put first on its
# PYTHONPATH. SCRATCH (default /var/lib/planar3d-container-check) keeps the debootstrap root file
# system and the work folders; a second run reuses the base images and Docker's layer cache.
#
# Steps: Docker engine (installed and started if missing, stopped at the end if started here) ->
# local/bookworm-python:raw (debootstrap, since no registry may be reachable) ->
# local/planar3d-base:cpu (scripts/container/cpu-base.Dockerfile: CPU torch from pip's local wheel
# folder, the host CA bundle) -> planar3d:check (the project's Dockerfile with that BASE_IMAGE) ->
# runs as an arbitrary uid. Prints one PASS/FAIL line per check and exits 1 if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SCRATCH="${1:-/var/lib/planar3d-container-check}"
PYTHON="${PYTHON:-python3}"
RAW_IMAGE=local/bookworm-python:raw
BASE_IMAGE=local/planar3d-base:cpu
IMAGE=planar3d:check
RUN_AS=1234:1234           # a uid with no passwd entry on the host or in the image
WORK="$SCRATCH/work"
FAILED=0
STARTED_DOCKERD=""

say() { printf '%s\n' "$*"; }
check() {  # check NAME COMMAND...: PASS when COMMAND succeeds
  local name="$1"; shift
  if "$@"; then say "PASS $name"; else say "FAIL $name"; FAILED=1; fi
}
die() { say "FAIL $*"; exit 1; }
host() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'from pipelines.cli import main; main()' "$@"; }
# OpenBLAS picks its kernels from the CPU unless told (this machine's environment sets
# OPENBLAS_CORETYPE); numpy's matrix products, hence the synthetic phantoms, round differently
# with other kernels. The container gets the host's settings so that results can be equal.
BLAS_ENV=()
for name in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS OMP_NUM_THREADS; do
  [ -n "${!name:-}" ] && BLAS_ENV+=(-e "$name")
done
# The README's command shape: host user's ids, read-only inputs, writable /output.
container() { docker run --rm --user "$RUN_AS" "${BLAS_ENV[@]}" "$@"; }

stop_dockerd() { [ -n "$STARTED_DOCKERD" ] && kill "$STARTED_DOCKERD" && wait "$STARTED_DOCKERD" 2>/dev/null; }
trap stop_dockerd EXIT

[ "$(id -u)" = 0 ] || die "needs root (Docker engine, debootstrap, chown)"
mkdir -p "$SCRATCH"
say "== $(date -u '+%Y-%m-%d %H:%M UTC') checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')"

# --- engine ----------------------------------------------------------------------------------
if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null; then
  apt-get update -q > "$SCRATCH/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    docker.io containerd runc debootstrap iptables >> "$SCRATCH/apt.log" 2>&1 || die "apt-get install (see $SCRATCH/apt.log)"
fi
if ! docker info > /dev/null 2>&1; then
  dockerd > "$SCRATCH/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
fi
docker info > /dev/null 2>&1 || die "Docker engine did not start (see $SCRATCH/dockerd.log)"
say "docker $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}'), cgroup v$(docker info --format '{{.CgroupVersion}}')"

# --- base images -----------------------------------------------------------------------------
if ! docker image inspect "$RAW_IMAGE" > /dev/null 2>&1; then
  if [ ! -x "$SCRATCH/rootfs/usr/bin/python3" ]; then
    rm -rf "$SCRATCH/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$SCRATCH/rootfs" http://deb.debian.org/debian > "$SCRATCH/debootstrap.log" 2>&1 \
      || die "debootstrap (see $SCRATCH/debootstrap.log)"
  fi
  tar -C "$SCRATCH/rootfs" -c . | docker import - "$RAW_IMAGE" > /dev/null || die "docker import"
fi
if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
  context="$SCRATCH/base-context"
  rm -rf "$context" && mkdir -p "$context"
  # pip takes the CPU wheel from wherever this machine's pip config finds it (find-links).
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    -d "$context" "torch==2.13.0+cpu" || die "pip download torch==2.13.0+cpu"
  cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca.crt"
  printf '[global]\ncert = /etc/ssl/certs/host-ca.crt\n' > "$context/pip.conf"
  cp "$ROOT/constraints.txt" "$context/"
  docker build -q -f "$ROOT/scripts/container/cpu-base.Dockerfile" --build-arg ROOTFS_IMAGE="$RAW_IMAGE" \
    -t "$BASE_IMAGE" "$context" > "$SCRATCH/base-build.log" 2>&1 || die "base image (see $SCRATCH/base-build.log)"
fi

# --- the project's image ---------------------------------------------------------------------
start=$SECONDS
if docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$ROOT" > "$SCRATCH/image-build.log" 2>&1; then
  say "PASS docker build --build-arg BASE_IMAGE=$BASE_IMAGE ($((SECONDS - start)) s, $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}'))"
else
  die "docker build (see $SCRATCH/image-build.log)"
fi
check "no test tools in the image" bash -c "! docker run --rm --entrypoint python $IMAGE -m pip show pytest > /dev/null 2>&1"
check "--help as $RUN_AS" bash -c "docker run --rm --user $RUN_AS $IMAGE --help 2>&1 | grep -q predict"

# --- data, host reference run ----------------------------------------------------------------
rm -rf "$WORK" && mkdir -p "$WORK/host" "$WORK/container"
host synth --out "$WORK/data" --cases 6 --seed 0 --size small > "$WORK/host/synth.log" 2>&1 || die "host synth"
TRAIN_ARGS=(--fold 0 --config tiny --encoder-weights none --deterministic --device cpu optim.epochs=1)
host train --manifest "$WORK/data/manifest.json" --out "$WORK/host/train" "${TRAIN_ARGS[@]}" > "$WORK/host/train.log" 2>&1 \
  || die "host train (see $WORK/host/train.log)"
host predict -i "$WORK/data/images" -o "$WORK/host/predict" --model "$WORK/host/train" > "$WORK/host/predict.log" 2>&1 \
  || die "host predict"
host rerun "$ROOT/pipelines/experiments/synthetic_tiny.yaml" --out "$WORK/host/rerun" > "$WORK/host/rerun.log" 2>&1 \
  || die "host rerun"

# --- container runs as $RUN_AS -----------------------------------------------------------------
# The host user creates the output folder (README); here "the host user" is uid 1234.
for name in predict train rerun; do install -d -o "${RUN_AS%:*}" -g "${RUN_AS#*:}" -m 0755 "$WORK/container/$name"; done
container -v "$WORK/data:/data:ro" -v "$WORK/host/train:/model:ro" -v "$WORK/container/predict:/output" \
  "$IMAGE" predict -i /data/images -o /output --model /model > "$WORK/container/predict.log" 2>&1
check "predict as $RUN_AS (read-only /data and /model)" test $? = 0
# JSON files record paths and processes (model path, worker pid and host), so only the masks
# and the lesion reports are compared byte for byte.
SAME_OUTPUTS=(-x '*.json' -x .planar3d)
check "predict masks byte-equal to the host's" diff -r -q "${SAME_OUTPUTS[@]}" "$WORK/host/predict" "$WORK/container/predict"

container -v "$WORK/data:/data:ro" -v "$WORK/container/train:/output" \
  "$IMAGE" train --manifest /data/manifest.json --out /output/run "${TRAIN_ARGS[@]}" > "$WORK/container/train.log" 2>&1
check "train one tiny epoch as $RUN_AS" test $? = 0
check "train metrics equal to the host's (all but seconds, voxels_per_second)" \
  cmp <(cut -d, -f1-5 "$WORK/host/train/metrics.csv") <(cut -d, -f1-5 "$WORK/container/train/run/metrics.csv")

# The experiment as users run it: the container generates its synthetic data itself.
container -v "$ROOT/pipelines/experiments:/experiments:ro" -v "$WORK/container/rerun:/output" \
  "$IMAGE" rerun /experiments/synthetic_tiny.yaml --out /output/synthetic_tiny \
  --compare /experiments/synthetic_tiny_reference.json > "$WORK/container/rerun.log" 2>&1
check "rerun synthetic_tiny as $RUN_AS within the reference's tolerances" test $? = 0
check "rerun data generated in the container byte-equal to the host's" diff -r -q "$WORK/host/rerun/data" "$WORK/container/rerun/synthetic_tiny/data"
check "rerun results equal to the host's" "$PYTHON" -c '
import json, sys
host, container = (json.load(open(path))["results"] for path in sys.argv[1:])
sys.exit(host != container)' "$WORK/host/rerun/reproducibility.json" "$WORK/container/rerun/synthetic_tiny/reproducibility.json"
# Each side trained its own model: the checkpoints differ in their run records (paths, times), so
# the masks' header descrip (model SHA-256) differs; voxels and geometry must not.
check "rerun masks equal to the host's (voxels, affine, qform/sform)" "$PYTHON" -c '
import sys
from pathlib import Path
import nibabel as nib, numpy as np
host, container = map(Path, sys.argv[1:])
masks = sorted(p.relative_to(host) for p in host.rglob("*_mask.nii.gz"))
assert masks and masks == sorted(p.relative_to(container) for p in container.rglob("*_mask.nii.gz"))
for name in masks:
    a, b = nib.load(host / name), nib.load(container / name)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name
    assert np.array_equal(a.affine, b.affine) and np.array_equal(a.get_qform(), b.get_qform()), name
    assert np.array_equal(a.get_sform(), b.get_sform()) and a.header["qform_code"] == b.header["qform_code"], name
' "$WORK/host/rerun/runs/fold0_seed0/predictions" "$WORK/container/rerun/synthetic_tiny/runs/fold0_seed0/predictions"
say "(environment passed to the container: ${BLAS_ENV[*]:-none})"

# --- the Slurm array example, with a stand-in for apptainer (none installs here) ----------------
# The stand-in maps `apptainer run [--nv] -B SRC:DST[:ro]... SIF ARGS` to docker run as $RUN_AS,
# which checks the job script's sharding and mounts, not Apptainer itself.
mkdir -p "$SCRATCH/apptainer-stand-in"
cat > "$SCRATCH/apptainer-stand-in/apptainer" <<STAND_IN
#!/usr/bin/env bash
set -euo pipefail
[ "\$1" = run ] && shift
volumes=()
while [ \$# -gt 0 ]; do case "\$1" in --nv) shift ;; -B) volumes+=(-v "\$2"); shift 2 ;; *) break ;; esac; done
shift  # the .sif
exec docker run --rm --user $RUN_AS "\${volumes[@]}" $IMAGE "\$@"
STAND_IN
chmod +x "$SCRATCH/apptainer-stand-in/apptainer"
install -d -o "${RUN_AS%:*}" -g "${RUN_AS#*:}" -m 0755 "$WORK/container/slurm"
slurm_status=0
for part in 0 1; do
  PATH="$SCRATCH/apptainer-stand-in:$PATH" SLURM_ARRAY_TASK_COUNT=2 SLURM_ARRAY_TASK_ID=$part DEVICE=cpu \
    SIF=planar3d.sif bash "$ROOT/scripts/slurm/predict_parts.sbatch" "$WORK/data/images" "$WORK/container/slurm" \
    "$WORK/host/train" > "$WORK/container/slurm_part$part.log" 2>&1 || slurm_status=1
done
check "slurm array job, 2 parts as $RUN_AS" test "$slurm_status" = 0 -a -f "$WORK/container/slurm/predictions.json" \
  -a -n "$(ls "$WORK/container/slurm/.planar3d/parts/"part0of2-* 2>/dev/null)" -a -n "$(ls "$WORK/container/slurm/.planar3d/parts/"part1of2-* 2>/dev/null)"
# Sharded parts write no lesion report (a plain rerun does: docs/prediction.md).
check "slurm array masks byte-equal to the host's" diff -r -q "${SAME_OUTPUTS[@]}" -x 'lesion_report_*' "$WORK/host/predict" "$WORK/container/slurm"

# --- what the host user gets -----------------------------------------------------------------
check "every output owned by $RUN_AS" test -z "$(find "$WORK/container" -mindepth 1 -not -name '*.log' \( ! -uid "${RUN_AS%:*}" -o ! -gid "${RUN_AS#*:}" \) -print -quit)"
check "every output file 0644, every folder 0755" test -z "$(find "$WORK/container" -mindepth 1 -not -name '*.log' \
  \( \( -type f ! -perm 0644 \) -o \( -type d ! -perm 0755 \) \) -print -quit)"

# --- a folder the user cannot write: one line, before the model loads --------------------------
mkdir -p "$WORK/container/root-owned" && chmod 0755 "$WORK/container/root-owned"
message="$(container -v "$WORK/data:/data:ro" -v "$WORK/host/train:/model:ro" -v "$WORK/container/root-owned:/output" \
  "$IMAGE" predict -i /data/images -o /output --model /model 2>&1)"
status=$?
check "predict into a root-owned 0755 folder fails at once: '$(printf '%s' "$message" | tail -n 1)'" \
  test "$status" != 0 -a -z "$(ls -A "$WORK/container/root-owned")" -a "$(printf '%s' "$message" | grep -c 'output folder is not writable')" = 1

if [ "$FAILED" = 0 ]; then say "ALL PASSED"; else say "SOME FAILED (logs in $WORK)"; fi
exit "$FAILED"
