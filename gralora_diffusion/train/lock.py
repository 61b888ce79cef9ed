"""One run per --output_dir: a `.lock` file holding the running process's pid (and host).

Not `filelock` (huggingface_hub's dependency): its lock file names no process, so the error could
not say which run holds the folder, and its flock-based lock is unreliable on network filesystems.
A lock whose pid is no longer alive on this host (a killed run) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from ..errors import TrainConfigError
from ..numbers import whole_number

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's {pid, host}, or None when it is stale (dead pid on this host, or unreadable)."""
    try:
        holder = json.loads(path.read_text())
        pid, host = whole_number(holder["pid"], "pid", ValueError, low=1), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):  # pid: a C int (os.kill overflows on 2**40)
        return None
    if host == socket.gethostname() and not _alive(pid):
        return None
    return {"pid": pid, "host": host}


@contextlib.contextmanager
def output_dir_lock(output_dir, enabled: bool = True):
    """Hold `output_dir/.lock` while the block runs (only where `enabled`: the main process)."""
    if not enabled:
        yield
        return
    from ..atomic import write_error

    path = Path(output_dir) / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None:
                raise TrainConfigError(
                    f"--output_dir {output_dir}: another run (pid {holder['pid']} on {holder['host']}) is writing there; "
                    f"wait for it or pick another --output_dir (delete {path} if no such run is alive).") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a killed run's lock
            continue
        except OSError as err:  # read-only folder, no permission, a name too long
            raise write_error(path, err) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(mine)
        except OSError as err:  # disk full: no empty lock is left behind
            path.unlink(missing_ok=True)
            raise write_error(path, err) from None
        break
    else:
        raise TrainConfigError(f"--output_dir {output_dir}: could not take {path}; another run is starting there.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == mine:
                path.unlink()
