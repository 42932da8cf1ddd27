# A CPU-only stand-in for the CUDA PyTorch base image, for machines that cannot pull from a
# registry (scripts/container_check.sh builds it). FROM is a Debian bookworm root file system made
# with debootstrap and imported into Docker; the build context holds torch's CPU wheel, the
# host's CA bundle and a pip.conf naming it (pip behind a TLS-inspecting proxy needs the host CA).
#   docker build -f scripts/container/cpu-base.Dockerfile -t local/planar3d-base:cpu CONTEXT
# The result matches what the Dockerfile expects of any BASE_IMAGE: `python` on PATH with pip and
# torch 2.13.0 installed, running as root.
ARG ROOTFS_IMAGE=local/bookworm-python:raw
FROM ${ROOTFS_IMAGE}

COPY host-ca.crt /etc/ssl/certs/host-ca.crt
COPY pip.conf /etc/pip.conf
COPY constraints.txt /tmp/constraints.txt
COPY torch-2.13.0+cpu-*.whl /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir -c /tmp/constraints.txt /tmp/wheels/torch-*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt

ENV PATH=/opt/venv/bin:${PATH} \
    LANG=C.UTF-8
CMD ["python"]
