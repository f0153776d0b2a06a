"""Safe outputs: atomic writes, verified checkpoints, and the lock of a run's directory.

- :func:`write_atomic` writes every output of a run (checkpoint, metrics, picture): a
  temporary file in the same directory, flushed to disk, then renamed over the target. A
  crash leaves the old file or the new one, never a torn one, and a symlink planted at the
  target is replaced, not followed.
- :func:`save_checkpoint` / :func:`load_checkpoint`: a ``torch.save`` payload behind a
  one-line header holding its SHA-256, so that a truncated, foreign or bit-flipped file is
  refused with :class:`CheckpointError` instead of a pickle or zip error.
- :class:`RunLock`: an exclusive ``flock`` on ``DIR/.lock`` for the whole run; the kernel
  drops it when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "write_atomic",
    "save_atomic",
    "save_checkpoint",
    "load_checkpoint",
    "check_writable",
    "CheckpointError",
    "RunLock",
    "RunLockedError",
]

#: The first bytes of a checkpoint file: the format's name and version.
MAGIC = b"pyro_cnf checkpoint 1"
#: The lock file of a run directory.
LOCK_NAME = ".lock"


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then
    ``os.replace``: readers see the old file or the new one, never part of one.

    The file gets the permissions ``open()`` would give it (``0o666`` less the umask). If
    ``path`` is a symlink, the link is replaced by the file; its target is left alone.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
        >>> write_atomic(path, b"{}")
        >>> path.read_bytes(), [p.name for p in path.parent.iterdir()]
        (b'{}', ['metrics.json'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power cut


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened there, and renames are durable
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` by :func:`write_atomic`.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.pt"
        >>> save_atomic({"step": 3}, path)
        >>> torch.load(path)["step"]
        3
    """
    write_atomic(path, _serialise(obj))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, damaged, foreign, or of another model.

    Attributes:
        path: The checkpoint file.
        reason: What is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str, *, damaged: bool = True) -> None:
        suffix = "; it was not written by this program or is damaged" if damaged else ""
        super().__init__(f"cannot read checkpoint {path}: {reason}{suffix}")
        self.path = Path(path)
        self.reason = reason


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically as
    ``MAGIC sha256=HEX\\n`` followed by its ``torch.save`` bytes.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> save_checkpoint({"step": 3, "weights": torch.ones(2)}, path)
        >>> load_checkpoint(path, {"step": int})["step"]
        3
        >>> data = bytearray(path.read_bytes()); data[-30] ^= 1  # flip one bit
        >>> _ = path.write_bytes(bytes(data))
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as error:
        ...     print(error.reason)
        its checksum does not match its contents
    """
    payload = _serialise(dict(state))
    header = MAGIC + b" sha256=" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    write_atomic(path, header + payload)


def load_checkpoint(
    path: str | os.PathLike,
    keys: Mapping[str, type | tuple[type, ...]] | None = None,
    map_location: torch.device | str | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verified before it is unpickled
    (``weights_only``: no code runs).

    Arguments:
        path: The file.
        keys: Entries the checkpoint must hold, with their types.
        map_location: Where its tensors go.

    Raises:
        CheckpointError: The file cannot be read, is not a checkpoint of this format, its
            checksum does not match, or it lacks one of ``keys``.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(path, error.strerror or str(error), damaged=False) from None
    header, newline, payload = raw.partition(b"\n")
    magic, _, digest = header.rpartition(b" sha256=")
    if not raw:
        raise CheckpointError(path, "the file is empty")
    if raw.startswith(b"PK\x03\x04"):  # a zip: what torch.save writes, and pyro_cnf wrote before the header
        raise CheckpointError(path, "it is a plain torch.save file, without the checksum header of a checkpoint")
    if not newline or magic != MAGIC or len(digest) != 64:
        raise CheckpointError(path, "it does not start with the checkpoint header")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(path, "its checksum does not match its contents")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle verified bytes means a foreign writer
        raise CheckpointError(path, f"its contents do not load ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"it holds a {type(state).__name__}, not a dict")
    for key, kind in (keys or {}).items():
        if key not in state:
            raise CheckpointError(path, f"it has no {key!r} entry")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(path, f"its {key!r} entry is a {type(state[key]).__name__}")
    return state


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` now if a file cannot be written to ``path`` by :func:`write_atomic`
    later: its directory is missing or read-only, or ``path`` is a directory or a read-only
    or immutable file.

    Example:
        >>> check_writable("/nonexistent/checkpoint.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: cannot write /nonexistent/checkpoint.pt: the directory /nonexistent does not exist
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the directory {parent} is not writable")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    # os.replace over an immutable file fails; access() reports immutability (and read-only mode)
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {path}: the file is read-only or immutable")


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory.

    Attributes:
        lock: The lock file.
        holder: What the holder wrote into it (process id, host, start time, command).
    """

    def __init__(self, lock: Path, holder: str) -> None:
        super().__init__(f"{lock.parent} is in use by another run: {lock} is held by {holder or 'an unknown process'}")
        self.lock = lock
        self.holder = holder


class RunLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`
    (or for a ``with`` block): an ``flock`` on ``directory/.lock``, which names its holder.

    The kernel releases the lock when the holder exits or is killed, so a stale lock file
    never blocks the next run. POSIX only.

    Example:
        >>> import tempfile
        >>> directory = tempfile.mkdtemp()
        >>> with RunLock(directory):
        ...     RunLock(directory).acquire()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pyro_cnf.training.checkpoint.RunLockedError: ... is in use by another run: .../.lock is held by pid ...
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` at once if another process holds it."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise RunLockedError(self.path, holder) from None
            # The previous holder unlinks the file on release: if it did so between our open
            # and our flock, we hold a lock on a file nobody else will open; start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(sys.argv) or "python"
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up and remove the lock file (idempotent)."""
        if self._fd is None:
            return
        # before closing: nobody can lock this file meanwhile. A directory made read-only
        # keeps the file, which is harmless (the lock goes with the descriptor) and must not
        # hide the error that is ending the run.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
