"""File I/O, in one place: atomic writes of a file and of a directory, SHA-256 of a file, and a
writability probe.

Why atomic: a run, a cache or a model directory must never look complete when it is not. Each
writer here assembles its output beside the destination (same file system, so the final
``os.replace`` is a rename) and renames it into place only once it is whole; a process killed
half-way leaves a ``.tmp-*`` file or directory that no reader takes for the real thing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place. The file gets
    the permissions the umask gives a new file (``mkstemp`` alone would make it 0600)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str, fsync: bool = False) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync)


def atomic_write_json(path: str, obj: Any, fsync: bool = False) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (non-JSON values as ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str), fsync)


def atomic_dir(out_dir: str, fill: Callable[[str], None]) -> None:
    """Build a directory by calling ``fill(tmp)`` on an empty temporary directory beside
    ``out_dir``, then put it in place of ``out_dir`` (replacing an older one). If ``fill``
    raises, nothing at ``out_dir`` changes and the temporary directory is removed."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str, h: Optional["hashlib._Hash"] = None) -> str:
    """Hex SHA-256 of the whole file (read in 4 MiB blocks); feeds ``h`` when given."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str, field: str, fix: str = "choose another directory or fix its "
                                                     "permissions", create: bool = True,
                   keep: bool = True) -> None:
    """Fail now, before any work, when directory ``path`` cannot be created or written.
    The error names the recipe ``field`` the directory came from, the path and the fix. With
    ``create=False`` nothing is made: the nearest existing directory on the way must be
    writable (a dry run leaves no trace); with ``keep=False`` what was made to check it is
    removed again."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{field}: {path!r} is a file, not a directory; {fix}")
    if not create:
        probe = os.path.abspath(path)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
            raise PermissionError(f"{field}: {path!r} cannot be written ({probe!r} is not a "
                                  f"writable directory); {fix}")
        return
    # keep=False: the directories this check makes are removed again (an output_dir: a run
    # refused later, for a bad value found with the data or an unreachable budget, leaves no
    # empty directory behind; the writers make it when they write).
    made, probe_dir = [], os.path.abspath(path)
    while not os.path.exists(probe_dir):
        made.append(probe_dir)
        probe_dir = os.path.dirname(probe_dir)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{field}: {path!r} is not writable ({e.strerror or e}); "
                              f"{fix}") from e
    for d in made if not keep else ():  # the deepest first
        try:
            os.rmdir(d)
        except OSError:  # written into meanwhile: it stays
            break
