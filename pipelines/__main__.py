"""``python -m pipelines`` runs the ``planar3d`` command (e.g. under ``torchrun -m pipelines``)."""

from pipelines.cli import main

main()
