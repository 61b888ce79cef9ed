"""Writing a file so that no reader sees it half-written and no failure leaves a fragment behind:
`atomic_write` (adapters, exports, model cards, configs, class images all go through it)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from safetensors import SafetensorError

from .errors import GraloraError, OutputError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(temp_path), then rename over `path`: a reader never sees a half-written file.

    The file gets the mode a plain open() would give it: the existing file's, else 0o666 minus the
    umask (0644 under umask 022), not mkstemp's 0600 that hid adapters from other users and services.
    A failed write (disk full, read-only folder, no permission) raises `OutputError` naming the
    path; the temp file is removed and a file already at `path` is unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _create_temp(path)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # again: a writer may replace the file (safetensors' save_file makes it 0600)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        io_error = isinstance(err, OSError) or (isinstance(err, SafetensorError) and "os error" in str(err))
        if io_error and not isinstance(err, GraloraError):
            raise write_error(path, err) from None
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """(an empty, new temp file beside `path`, the mode `path` should get): the mode open() gives a
    new file (0o666 & ~umask, read back from the temp file, so the umask is never changed) or the
    mode of the file it will replace."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode) if mode is None else mode
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent))


def write_error(path: Path, err: Exception) -> OutputError:
    """One line for a failed write: the path, the cause, what to do, and that nothing was written."""
    code = getattr(err, "errno", None)
    text = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    if code == errno.ENOSPC or "No space left" in str(err):
        todo = "the disk is full: free some space or write to another folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "the folder is read-only or not yours: pick another output folder or fix its permissions"
    else:
        todo = "check the path and the disk"
    out = OutputError(f"{path}: cannot write ({text}); {todo}. Nothing was written; a file already there is unchanged.")
    out.errno = code
    return out
