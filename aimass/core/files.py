"""Private files: the run directory, tokens, checkpoints and state are the running user's alone.

Directories are created 0700 and files 0600 (written atomically: readers see the old or the new
file). ``check_private`` refuses a file that another user owns or that group / others may write,
with an error that says what to do: a token or key others may write is one they chose.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeFileError(PermissionError):
    """A file that must be private is owned by someone else or writable by group / others."""


def private_dir(path: str | Path) -> Path:
    """``path`` created 0700 (with its missing parents); one we own loses group / other access."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
    return path


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (mkstemp creates it so); new parents 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private(path: str | Path) -> Path:
    """``path`` created empty with mode 0600 if missing (before a library opens it with its own mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return path


def check_private(path: str | Path, what: str) -> None:
    """Raise UnsafeFileError unless ``path`` belongs to this user and only this user may write it."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise UnsafeFileError(f"refusing {what} {path}: it belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.geteuid()}); check who wrote it, then delete it or `chown` it")
    if st.st_mode & 0o022:
        raise UnsafeFileError(f"refusing {what} {path}: group or others may write it "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}); check who wrote it, then "
                              f"`chmod go-w {path}` or delete it")
