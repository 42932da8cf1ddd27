"""Read and write NIfTI volumes keeping their geometry, and write any file atomically.

Arrays are in NIfTI voxel order ``(i, j, k)``, as nibabel returns them. Every problem with an
input file is an :class:`planar3d.errors.InputError` naming the file, never a nibabel, zlib or
EOF traceback. Every file this module writes appears at its final path whole or not at all: it is
written to a temporary file in the same folder, flushed to disk and moved into place with
:func:`os.replace`, with the mode a plain ``open`` would give (``0o666`` less the umask, so
``0644`` usually) rather than the ``0600`` of :func:`tempfile.mkstemp`: outputs written by a
container or a batch job stay readable by the users and jobs that read them next.

Example:
    >>> data, image = read_volume("flair.nii.gz")                     # doctest: +SKIP
    >>> write_like(data > 100, image, "flair_mask.nii.gz")            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import nibabel as nib
import numpy as np

from planar3d.errors import InputError
from planar3d.naming import NIFTI_EXTENSIONS

_CHUNK = 1 << 20


def _suffix(path: Path) -> str:
    """The NIfTI extension of ``path`` (``.nii.gz`` or ``.nii``), else its last suffix."""
    lower = path.name.lower()
    for extension in NIFTI_EXTENSIONS:
        if lower.endswith(extension):
            return path.name[-len(extension):]
    return path.suffix


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux).

    Elsewhere it is set and put back at once, which another thread creating a file in between
    could notice; only where ``/proc`` lacks the line.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` if needed and check that files can be written in it.

    Called before a model loads or trains, so that a read-only mount or a folder owned by another
    user fails in a second with one line, not after the work is done. The check creates and
    removes a file, which also catches read-only file systems and ACLs that :func:`os.access`
    may miss.

    Raises:
        InputError: ``path`` is a file, cannot be created, or is not writable.
    """
    path = make_folder(path)
    try:
        handle, name = tempfile.mkstemp(dir=path, prefix=".planar3d-write-check.")
    except OSError:
        raise InputError(path, "output folder is not writable") from None
    os.close(handle)
    os.unlink(name)
    return path


@contextlib.contextmanager
def _temporary_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds.

    The temporary file keeps the extension of ``path`` (so nibabel picks the same format) and gets
    the mode of a plainly created file before the move. On any error it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + _suffix(path))
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` only when the block succeeds.

    Args:
        path: final file path; its folder must exist.
        mode: ``"wb"`` or ``"w"`` (any writing mode of :func:`open`).
        **open_kwargs: passed to :func:`open` (e.g. ``encoding="utf-8"``).

    Example:
        >>> with atomic_write("log.csv", "w") as stream:   # doctest: +SKIP
        ...     stream.write("epoch,loss\\n")
    """
    with _temporary_path(path) as temporary:
        with open(temporary, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as stream:
        stream.write(text)


def atomic_save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a 3D NIfTI image, reading its data once so that a damaged file fails here.

    A 4D image whose trailing axes have size 1 is squeezed to 3D. The returned image holds the
    data in memory (scaled by ``scl_slope``/``scl_inter`` if the file has them).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image, with a 3D in-memory array and the file's header.

    Raises:
        InputError: missing or unreadable file, not NIfTI, truncated or corrupt data, not 3D,
            non-finite or degenerate affine.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):
            raise InputError(path, f"not a NIfTI file (read as {type(image).__name__})")
        data = np.asanyarray(image.dataobj)
    except InputError:
        raise
    except Exception as error:  # nibabel, gzip, zlib and EOF errors all mean a bad file
        raise InputError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
    affine = image.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine has non-finite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "affine is degenerate (zero determinant)")
    return type(image)(data, affine, image.header, extra=image.extra)


def read_volume(path: str | os.PathLike, dtype: Any = np.float32) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3D NIfTI volume as an array, with its image for the geometry.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: array type to return (``None`` keeps the stored type).

    Returns:
        ``(data, image)``: the ``(i, j, k)`` array and the image from :func:`load_image`.

    Raises:
        InputError: as :func:`load_image`, or when voxels are NaN or infinite.
    """
    image = load_image(path)
    data = np.asarray(image.dataobj, dtype=dtype)
    if data.dtype.kind in "fc":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(path, f"{bad} voxels are NaN or infinite")
    return data, image


def voxel_spacing(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size along ``(i, j, k)`` in the header's units (usually mm)."""
    zooms = image.header.get_zooms()[:3]
    return tuple(float(zoom) for zoom in zooms)  # type: ignore[return-value]


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to ``dtype``, refusing values that an integer type cannot hold exactly."""
    if dtype.kind in "iub" and array.dtype.kind == "f":
        if array.size and not np.all(np.isfinite(array)):
            raise ValueError(f"cannot store NaN or infinite values as {dtype}")
    cast = array.astype(dtype, copy=False)
    if dtype.kind in "iu" and array.dtype.kind in "iuf" and not np.array_equal(cast, array):
        raise ValueError(f"values do not fit {dtype} exactly (range {array.min()}..{array.max()})")
    return cast


def write_like(
    array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, dtype: Any = np.uint8
) -> None:
    """Write ``array`` as a NIfTI file on the grid of ``reference``, atomically.

    The file gets the reference's shape, affine, qform and sform with their codes, pixdim and
    units, and ``dtype`` with no intensity scaling (values are stored exactly as given).

    Args:
        array: ``(i, j, k)`` data with exactly the reference's 3D shape.
        reference: the image whose geometry to copy (e.g. from :func:`read_volume`).
        path: output ``.nii.gz`` or ``.nii`` path; its folder must exist.
        dtype: stored data type.

    Raises:
        ValueError: shapes differ, or the values do not fit ``dtype``.
    """
    array = np.asanyarray(array)
    dtype = np.dtype(dtype)
    if array.shape != reference.shape[:3] or len(reference.shape) != 3:
        raise ValueError(f"{path}: array shape {array.shape} differs from reference shape {reference.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    image = nib.Nifti1Image(_cast(array, dtype), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    with _temporary_path(path) as temporary:
        nib.save(image, temporary)


def make_folder(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents) if needed; returns it.

    Raises:
        InputError: ``path`` (or a parent) is a file, or the folder cannot be created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(path, f"folder cannot be created ({error.strerror or error})") from None
    return path


def make_parent_folder(path: str | Path) -> Path:
    """Check that ``path`` can be written as a file and create its folder; returns ``path``.

    Raises:
        InputError: ``path`` is a folder, or its folder cannot be created.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a file")
    make_folder(path.parent)
    return path
