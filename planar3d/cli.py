"""The ``planar3d`` console command.

Each subcommand is a thin wrapper: it parses arguments, imports the heavy modules lazily (so
``planar3d --help`` is instant) and calls one library function. Errors raised on purpose
(:class:`planar3d.errors.Planar3DError`) are reported as one line naming the file and the
problem, with exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from planar3d import __version__
from planar3d.errors import Planar3DError

app = typer.Typer(
    name="planar3d",
    help="Planar 3D transfer learning for MS lesion segmentation in raw FLAIR MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@app.command()
def inflate(
    vgg16: str = typer.Option(..., "--vgg16", help="'imagenet', 'none' or a path to a torchvision-layout VGG-16 state dict (.pth)."),
    out: Path = typer.Option(..., "--out", help="Where to write the planar 3D encoder checkpoint."),
    plane_axis: int = typer.Option(2, "--plane-axis", min=0, max=2, help="Spatial axis (0, 1, 2 of the array) normal to the kernel plane."),
    in_channels: int = typer.Option(1, "--in-channels", help="1 (RGB stem kernels summed) or 3 (as published)."),
    mode: str = typer.Option("planar", "--mode", help="'planar' (exact, default) or 'i3d' (repeat k times, divide by k)."),
    i3d_depth: int = typer.Option(3, "--i3d-depth", help="Kernel depth along the plane axis in i3d mode."),
) -> None:
    """Turn VGG-16 (blocks 1-4) into a planar 3D encoder checkpoint."""
    from planar3d.inflate import write_encoder_checkpoint

    try:
        summary = write_encoder_checkpoint(
            vgg16, out, plane_axis=plane_axis, in_channels=in_channels, mode=mode, i3d_depth=i3d_depth
        )
    except Planar3DError as error:
        fail(str(error))
    typer.echo(summary)


# --- subcommands added by later features go below this line (one import + one function each) ---


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``planar3d`` console script."""
    app(args=argv, prog_name="planar3d")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
