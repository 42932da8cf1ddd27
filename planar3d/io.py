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
import errno
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator, Optional

import nibabel as nib
import numpy as np

from planar3d.errors import InputError
from planar3d.naming import NIFTI_EXTENSIONS, display_path

__all__ = [
    "MAX_IMAGE_BYTES", "atomic_write", "atomic_write_text", "write_json", "json_safe",
    "sha256_file", "load_image", "read_volume", "voxel_spacing", "write_like", "display_path",
    "check_output_folder", "remove_stale_temporaries",
]

_CHUNK = 1 << 20

#: Largest image :func:`load_image` accepts by default, in bytes as stored (voxels x bytes per
#: voxel claimed by the header). A clinical FLAIR is 20-200 MB; the cap is checked on the header
#: alone, before any voxel is read, so a header claiming a huge volume cannot exhaust memory.
#: Callers pass ``max_image_bytes`` (``planar3d predict --max-image-gb``) to change it.
MAX_IMAGE_BYTES = 2 * 1024 ** 3

#: Stored data types :func:`load_image` accepts: real integers and floats. RGB (structured),
#: complex and boolean voxels are refused by name rather than converted.
ACCEPTED_DTYPE_KINDS = "iuf"

#: Temporary files of :func:`atomic_write` are ``.<name>.p<pid>@<host>.<random>.tmp<ext>`` in the
#: final file's folder: hidden, and naming the process that owns them (see
#: :func:`remove_stale_temporaries`).
_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.p(?P<pid>\d+)@(?P<host>[^/]*?)\.(?P<random>[A-Za-z0-9_]+)\.tmp(?P<ext>\.[^/]*)?$")


def host_name() -> str:
    """This machine's name as used in temporary and claim file names (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (signal 0 probes without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


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


@contextlib.contextmanager
def _temporary_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds.

    The temporary file keeps the extension of ``path`` (so nibabel picks the same format) and gets
    the mode of a plainly created file before the move. On any error it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.p{os.getpid()}@{host_name()}.", suffix=".tmp" + _suffix(path)
    )
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


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``).

    For values that can legitimately be undefined (a Dice of two empty masks, a distance to no
    surface): call it explicitly on them before :func:`write_json`, which refuses NaN.

    Example:
        >>> json_safe({"dice": float("nan"), "n": [1, float("inf"), 2.5]})
        {'dice': None, 'n': [1, None, 2.5]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def json_text(obj: Any) -> str:
    """Indented, strict JSON with a final newline; NaN and infinity raise ``ValueError``.

    Python's default writes a bare ``NaN``, which is not JSON and which other readers refuse.
    """
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON to ``path`` atomically (the one JSON writer).

    Raises:
        ValueError: ``obj`` holds NaN or infinity (pass it through :func:`json_safe` first where
            undefined values are legitimate); nothing is written then.
    """
    text = json_text(obj)
    atomic_write_text(path, text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_spacing(path: Path) -> np.ndarray:
    """``pixdim[1:4]`` as stored in the file (nibabel silently replaces negative ones by their abs).

    NIfTI-1: float32 at bytes 80-91 of a 348-byte header; NIfTI-2: float64 at 112-135 of 540.
    """
    from nibabel.openers import ImageOpener

    with ImageOpener(path, "rb") as stream:
        block = stream.read(136)
    for order in "<>":
        size = int(np.frombuffer(block[:4], f"{order}i4")[0]) if len(block) >= 4 else 0
        if size == 348 and len(block) >= 92:
            return np.frombuffer(block[80:92], f"{order}f4").astype(np.float64)
        if size == 540 and len(block) >= 136:
            return np.frombuffer(block[112:136], f"{order}f8").astype(np.float64)
    raise InputError(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")


def _check_header(path: Path, image: nib.Nifti1Image, max_image_bytes: int) -> None:
    """Refuse, from the header alone (no voxel read yet), what :func:`load_image` cannot use."""
    header = image.header
    shape = tuple(int(n) for n in image.shape)
    spatial = [n for n in shape[3:] if n != 1]
    if len(shape) < 3 or spatial:
        raise InputError(path, f"expected a 3D volume, got shape {shape}")
    if any(n <= 0 for n in shape):
        raise InputError(path, f"image has no voxels (shape {shape})")
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception as error:  # an unknown datatype code
        raise InputError(path, f"unsupported data type ({error})") from None
    if dtype.fields is not None or dtype.kind not in ACCEPTED_DTYPE_KINDS:
        name = "RGB" if dtype.fields is not None else str(dtype)
        raise InputError(path, f"unsupported data type {name} (accepted: real integer or float voxels)")
    spacing = _stored_spacing(path)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(path, f"voxel spacing {tuple(float(s) for s in spacing)} in the header must be finite and > 0")
    affine = image.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine has non-finite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "affine is degenerate (zero determinant)")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > max_image_bytes:
        raise InputError(
            path, f"header claims {claimed / 1024 ** 3:.2f} GiB of voxels {shape}, over the limit of "
            f"{max_image_bytes / 1024 ** 3:.2f} GiB (raise it with --max-image-gb)"
        )
    if not path.name.lower().endswith(".gz"):
        offset = int(header.get_data_offset())
        size = path.stat().st_size
        if offset + claimed > size:
            raise InputError(path, f"truncated: the header claims {offset + claimed} bytes, the file has {size}")


def load_image(path: str | os.PathLike, max_image_bytes: Optional[int] = None) -> nib.Nifti1Image:
    """Load a 3D NIfTI image, reading its data once so that a damaged file fails here.

    The header is checked before any voxel is read: 3D (trailing axes of size 1 are squeezed),
    at least one voxel, real integer or float data (not RGB, complex or bool), finite positive
    voxel spacing (``pixdim``), finite non-singular affine, claimed size at most
    ``max_image_bytes`` and, for an uncompressed ``.nii``, not larger than the file. The returned
    image holds the data in memory (scaled by ``scl_slope``/``scl_inter`` if the file has them).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        max_image_bytes: largest claimed size (voxels x bytes per stored voxel) accepted;
            default :data:`MAX_IMAGE_BYTES`.

    Returns:
        The image, with a 3D in-memory array and the file's header.

    Raises:
        InputError: missing or unreadable file, not NIfTI, truncated or corrupt data, not 3D, no
            voxels, unsupported data type, bad spacing, non-finite or degenerate affine, too large.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    limit = MAX_IMAGE_BYTES if max_image_bytes is None else int(max_image_bytes)
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):
            raise InputError(path, f"not a NIfTI file (read as {type(image).__name__})")
        _check_header(path, image, limit)
        data = np.asanyarray(image.dataobj)
    except InputError:
        raise
    except Exception as error:  # nibabel, gzip, zlib and EOF errors all mean a bad file
        raise InputError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
    return type(image)(data, image.affine, image.header, extra=image.extra)


def read_volume(
    path: str | os.PathLike, dtype: Any = np.float32, max_image_bytes: Optional[int] = None
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3D NIfTI volume as an array, with its image for the geometry.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: array type to return (``None`` keeps the stored type).
        max_image_bytes: size limit of :func:`load_image`.

    Returns:
        ``(data, image)``: the ``(i, j, k)`` array and the image from :func:`load_image`.

    Raises:
        InputError: as :func:`load_image`, or when voxels are NaN or infinite.
    """
    image = load_image(path, max_image_bytes)
    data = np.asarray(image.dataobj, dtype=dtype)
    if data.dtype.kind in "fc":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(path, f"{bad} voxels are NaN or infinite")
    return data, image


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((linear ** 2).sum(axis=0)))  # type: ignore[return-value]


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
    array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, dtype: Any = np.uint8,
    description: Optional[str] = None, intent_name: Optional[str] = None,
) -> None:
    """Write ``array`` as a NIfTI file on the grid of ``reference``, atomically.

    The file gets the reference's shape, affine, qform and sform with their codes, pixdim and
    units, and ``dtype`` with no intensity scaling (values are stored exactly as given).

    Args:
        array: ``(i, j, k)`` data with exactly the reference's 3D shape.
        reference: the image whose geometry to copy (e.g. from :func:`read_volume`).
        path: output ``.nii.gz`` or ``.nii`` path; its folder must exist.
        dtype: stored data type.
        description: header ``descrip`` (provenance, at most 80 ASCII characters; default: the
            reference's); it does not touch the geometry fields.
        intent_name: header ``intent_name`` (at most 16 ASCII characters; default: the reference's).

    Raises:
        ValueError: shapes differ, the values do not fit ``dtype``, or a header text is too long.
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
    for key, text, size in (("descrip", description, 80), ("intent_name", intent_name, 16)):
        if text is not None:
            encoded = text.encode("ascii")
            if len(encoded) > size:
                raise ValueError(f"{path}: header {key} holds at most {size} characters, got {text!r}")
            header[key] = encoded
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


def check_output_folder(folder: str | os.PathLike, inputs: Optional[str | os.PathLike] = None) -> Path:
    """Make sure results can be written to ``folder`` before any work starts; create it.

    Args:
        folder: the output folder (created with its parents if missing).
        inputs: the input folder or file, if any: the output may not be that folder (masks would
            be mixed with the scans they come from) nor the input file itself.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: ``folder`` is a file, equals ``inputs``, cannot be created, or is not writable.
    """
    folder = Path(folder)
    if inputs is not None:
        source = Path(inputs)
        if source.exists() and folder.exists() and folder.resolve() == source.resolve():
            what = "folder" if source.is_dir() else "file"
            raise InputError(folder, f"output folder is the input {what}: outputs would be mixed with the scans; choose another -o")
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "output exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".planar3d-write-probe.p{os.getpid()}@{host_name()}.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(folder, "output folder is not writable (read-only or no permission)") from None
        raise InputError(folder, f"output folder cannot be written: {error.strerror or type(error).__name__}") from None
    return folder


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float = 3600.0) -> list[Path]:
    """Delete temporary files left by :func:`atomic_write` in processes that died before renaming.

    Only files matching this module's temporary-name pattern are considered (any other file,
    hidden or not, is left alone). One is removed when the process named in it is gone (same
    machine), or, for a file written by another machine sharing the folder, when it has not been
    modified for ``older_than`` seconds.

    Returns:
        The files removed.
    """
    host, now, removed = host_name(), time.time(), []
    for file in Path(folder).rglob(".*.tmp*"):
        match = _TEMPORARY_NAME.match(file.name)
        if match is None or not file.is_file() or file.is_symlink():
            continue
        try:
            age = now - file.stat().st_mtime
        except FileNotFoundError:  # its owner just renamed it
            continue
        same_host = match["host"] == host
        if (same_host and not process_alive(int(match["pid"]))) or (not same_host and age > older_than):
            try:
                file.unlink()
            except FileNotFoundError:
                continue
            removed.append(file)
    return removed
