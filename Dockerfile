# planar3d on a PyTorch base image: a builder stage makes planar3d's wheel with the pinned build
# tools; the runtime stage installs that wheel with its runtime dependencies only (no pytest).
#
#   docker build -t planar3d .
#   mkdir -p masks && docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/scans:/data:ro" \
#       -v "$PWD/runs/fold0:/model:ro" -v "$PWD/masks:/output" planar3d predict -i /data -o /output --model /model
#   (GPU: add --gpus all --shm-size=8g ... --device cuda; README "Container" has every command.)
#
# BASE_IMAGE: any image with `python` (3.10+) on PATH, pip, and torch 2.13.0 installed, run as
# root. The default is the official CUDA runtime image. What was checked about it, without
# pulling it (no registry is reachable where this file was written):
# - The tag form <torch>-cuda<X.Y>-cudnn<N>-runtime is the one pytorch's docker.Makefile
#   (runtime-image target) pushes to Docker Hub; tags of that form are used as bases in public
#   projects up to pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime (a CUDA 13.0 / cuDNN 9 image).
# - Its Ubuntu release: the runtime image is built FROM the Makefile's BASE_RUNTIME, ubuntu:22.04
#   in the 2.x Makefiles seen, ubuntu:24.04 in a later copy; a project building on the 2.9.0
#   CUDA 13.0 runtime image reports Ubuntu 22.04. Either way this file creates no user (on 24.04
#   uid 1000 is already `ubuntu`, and `useradd --uid 1000` fails there).
# - Not checked: that the 2.13.0-cuda13.0 tag exists (torch 2.13.0 is what constraints.txt pins),
#   which Ubuntu it uses, or `--gpus all` on a GPU host. If the tag is missing, pick the existing
#   tag with torch 2.13.0 from https://hub.docker.com/r/pytorch/pytorch/tags.
# A CPU-only base works too: scripts/container_check.sh builds one (Debian bookworm, CPU torch)
# and passes it with --build-arg BASE_IMAGE=local/planar3d-base:cpu.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.cfg constraints.txt README.md ./
COPY scripts/install.sh scripts/
COPY planar3d/ planar3d/
COPY pipelines/ pipelines/
RUN bash scripts/install.sh --wheel /wheels

FROM ${BASE_IMAGE} AS runtime
# Any --user UID:GID works without a passwd entry: HOME and the matplotlib cache are writable by
# everyone, and USER/LOGNAME answer getpass.getuser() (MONAI calls it) before it looks up the uid.
# Outputs get the user's uid and 0644 (planar3d.io writes 0o666 less the umask).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/planar3d \
    USER=planar3d \
    LOGNAME=planar3d \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/opt/torch
WORKDIR /opt/planar3d
COPY constraints.txt ./
COPY scripts/install.sh scripts/
COPY --from=builder /wheels/ /tmp/wheels/
# torch.hub puts downloaded ImageNet weights in TORCH_HOME: writable by any uid (mount a folder
# there to keep them, or read-only to provide them offline).
RUN bash scripts/install.sh --runtime "$(ls /tmp/wheels/planar3d-*.whl)" \
    && rm -rf /tmp/wheels \
    && ! python -m pip show --quiet pytest 2>/dev/null \
    && mkdir -p /data /model /output "$TORCH_HOME" "$HOME" \
    && chmod 1777 "$HOME" /output "$TORCH_HOME"
# The shipped manifests and experiments, at the paths the README's commands use (an experiment
# names its manifest relative to itself: ../../data_manifests/).
COPY data_manifests/ data_manifests/
COPY pipelines/experiments/ pipelines/experiments/

# Not root by default; `docker run --user "$(id -u):$(id -g)"` gives outputs to the host user.
# No VOLUME: without -v, outputs stay in the container's own layer (visible to `docker cp`,
# removed with the container) instead of an anonymous volume that is easy to lose track of.
USER 1000:1000
WORKDIR /output
ENTRYPOINT ["planar3d"]
CMD ["--help"]
