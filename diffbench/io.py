"""Atomic file writes (a reader never sees a half-written results table or checkpoint), JSON
reads that name the broken file, and the lock on an output directory."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; ValueError naming the file when it is unreadable or not UTF-8."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; ValueError naming the file when it is unreadable, not UTF-8 or not JSON."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupt?): {exc}") from None


class DirectoryLocked(Exception):
    """Another process holds the lock on an output directory."""


class DirectoryLock:
    """An exclusive ``fcntl.flock`` on ``<dir>/.diffbench.lock`` holding the owner's PID, so two runs
    never write into one directory. The kernel drops the lock when the process dies (even by kill -9)."""

    NAME = ".diffbench.lock"

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / self.NAME
        self._file = None

    def acquire(self) -> "DirectoryLock":
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "?"
            file.close()
            raise DirectoryLocked(f"{self.path.parent} is in use by another diffbench run (PID {holder}); "
                                  f"wait for it or choose another --out") from None
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
