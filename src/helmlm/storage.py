"""Writing to disk without losing work: one writer per directory, and disk faults reported as one clear error.

Every command that writes a directory that outlives it (a run's ``out_dir``, a sweep's, a data directory, an
export's target) holds :func:`exclusive` on it while it writes. That is an OS lock (``flock``, through filelock), so
the kernel drops it when the process dies and a killed run never blocks the next one. Next to it sits a small owner
file (pid, host, command), so that a second writer is refused with ``... is in use by pid N``. The lock is advisory
and local: on a network file system without ``flock`` it protects nothing, so give concurrent jobs their own
directories there.

Writes run inside :func:`disk_errors`, which turns the operating system's refusals (a full disk or quota, a
read-only file system, a denied permission) into a :class:`~helmlm.errors.StorageError`: what failed and where, the
space needed against the space free, and what to do, with no traceback. safetensors and tokenizers are written by
Rust code that reports the same refusals as ``... (os error 28)``: those are recognised too.
:func:`check_free_space` refuses a write that cannot fit before a byte is written, where its size is known.

This module imports only the standard library, filelock and :mod:`helmlm.errors`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helmlm.errors import StorageError

LOCK_FILE = ".helmlm.lock"
OWNER_FILE = ".helmlm.lock.json"

# errno -> what the user reads; the faults a user can fix by freeing space or choosing another directory.
DISK_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def is_bookkeeping(path: Path) -> bool:
    """Whether ``path`` is one of this module's lock files (directory listings that judge whether a directory is
    empty or foreign skip them)."""
    return path.name.endswith((LOCK_FILE, OWNER_FILE))


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    """The sha256 of a file, read in chunks (about 1.6 GB/s on a 2-core AMD EPYC for a cached file)."""
    digest, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def free_bytes(path: str | Path) -> int | None:
    """Free space (for an unprivileged user) on the file system that holds ``path`` or its nearest existing
    parent; ``None`` when it cannot be known."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_free_space(path: str | Path, needed: int, what: str, then: str = "") -> None:
    """Refuse, before writing, ``what`` (``needed`` bytes under ``path``) when the file system has less free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise StorageError(f"cannot write {what} in {path}: it needs {human_bytes(needed)} and the disk has "
                           f"{human_bytes(free)} free; nothing was written. Free some space or choose another "
                           f"directory{'; ' + then if then else ''}")


def os_errno(err: BaseException) -> int | None:
    """The errno behind ``err``: an ``OSError``'s own, or the ``os error N`` that Rust libraries (safetensors,
    tokenizers) put in their messages."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = _RUST_OS_ERROR.search(str(err))
    return int(match.group(1)) if match else None


@contextmanager
def disk_errors(what: str, where: str | Path, needed: int | None = None, then: str = "") -> Iterator[None]:
    """Run a write of ``what`` under ``where``; a disk fault (:data:`DISK_FAULTS`) becomes one
    :class:`StorageError` saying what failed, where, the space needed (``needed`` bytes, when known) against the
    space free, and ``then`` (what survives and how to continue). Other errors pass through unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001  (only disk faults are translated; everything else is re-raised)
        code = os_errno(err)
        if code not in DISK_FAULTS:
            raise
        raise StorageError(disk_fault_message(code, what, where, needed, then)) from None


def disk_fault_message(code: int, what: str, where: str | Path, needed: int | None, then: str) -> str:
    message = f"cannot write {what} in {where}: {DISK_FAULTS[code]}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(where)
        space = [f"it needs {human_bytes(needed)}" if needed is not None else "",
                 f"{human_bytes(free)} {'are' if free != 1 else 'is'} free" if free is not None else ""]
        if any(space):
            message += f" ({', '.join(s for s in space if s)})"
        advice = "free some space (or point the output at a larger disk)"
    else:
        advice = "make the directory writable, or choose another one"
    return f"{message}. {advice[0].upper()}{advice[1:]}{'; ' + then if then else ''}"


# ------------------------------------------------------------------------------------------------ one writer


def _owner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _holder(owner_file: Path) -> str:
    """``pid N (host H, since T: COMMAND)`` from the holder's owner file, as far as it can be read."""
    try:
        owner = json.loads(owner_file.read_text())
        return (f"pid {owner['pid']} (on {owner.get('host', '?')} since {owner.get('since', '?')}: "
                f"{owner.get('command', '?')})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its owner file cannot be read)"


@contextmanager
def exclusive(directory: str | Path, what: str, side: bool = False) -> Iterator[Path]:
    """Hold the one-writer lock of ``directory`` for the block; raise :class:`StorageError` naming the holder's pid
    when another process holds it.

    The lock lives in ``directory`` (created when missing, and removed again if the block leaves it empty), or, with
    ``side=True``, beside it as ``.NAME.helmlm.lock`` (for a target that must not exist yet, such as an export's).
    Its files are removed on release; only a killed holder leaves them, and they block nobody."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    created = not directory.exists()
    base = directory.parent if side else directory
    prefix = f".{directory.name}" if side else ""
    lock_path, owner_path = base / f"{prefix}{LOCK_FILE}", base / f"{prefix}{OWNER_FILE}"
    with disk_errors(f"the lock of {what}", base):
        base.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise StorageError(f"{directory} is in use by {_holder(owner_path)}: only one process may write {what} "
                               "at a time. Wait for it to finish, stop it, or choose another directory") from None
        owner_tmp = owner_path.with_name(f"{owner_path.name}.tmp-{os.getpid()}")
        owner_tmp.write_text(json.dumps(_owner()) + "\n")
        os.replace(owner_tmp, owner_path)
    try:
        yield directory
    finally:
        # Leave nothing behind. The file goes before the release: a process that opened it meanwhile fails its
        # (non-blocking) flock on it, and one that comes later locks a new file, when this writer is done.
        owner_path.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
        if created and not side and directory.is_dir() and not any(directory.iterdir()):
            try:
                directory.rmdir()  # the block wrote nothing into the directory made for the lock
            except OSError:  # someone else's files arrived meanwhile
                pass
        lock.release()
