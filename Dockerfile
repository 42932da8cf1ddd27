# planar3d on a CUDA-capable PyTorch base image.
#   docker build -t planar3d .
#   docker run --gpus all --shm-size=8g -v /path/to/data:/data -v /path/to/output:/output planar3d --help
# The base image already carries torch 2.13.0 with CUDA; scripts/install.sh (the same install
# step CI runs) pins every other package with constraints.txt and keeps that torch.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch

WORKDIR /opt/planar3d
COPY pyproject.toml setup.cfg constraints.txt README.md ./
COPY scripts/ scripts/
COPY planar3d/ planar3d/
COPY pipelines/ pipelines/
COPY data_manifests/ data_manifests/
RUN bash scripts/install.sh --system \
    && useradd --create-home --uid 1000 planar3d \
    && mkdir -p /data /output /opt/torch \
    && chown planar3d:planar3d /data /output /opt/torch

USER planar3d
VOLUME ["/data", "/output"]
WORKDIR /output
ENTRYPOINT ["planar3d"]
CMD ["--help"]
