"""Cells in a supervised worker process (the way asv and pytest-xdist isolate benchmarks/tests).

The supervisor (the ``diffbench run`` process) sends one cell at a time to a worker process and
writes the row it gets back. A worker that dies in a cell (segfault, ``os._exit``, the kernel's
OOM killer, a CUDA error that poisons its context) or that runs past ``--cell-timeout`` is
killed and replaced; its cell becomes a ``failed`` row saying why, and the grid goes on.

Workers come from a ``forkserver``: one clean process, started once per run, that has imported
torch, diffbench and the installed plugins but run nothing (no threads, no CUDA context), so
forking it is safe, and a replacement worker starts in well under a second instead of
re-importing everything as a ``spawn`` would. A worker keeps its loaded datasets and models
between cells (:class:`~diffbench.runner.GridRunner` caches them), so isolation costs one pipe
round trip per cell.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

from diffbench.grid import Cell, RunConfig
from diffbench.registry import Registry
from diffbench.runner import CellResult, GridRunner, base_row, discard_samples, log, resolve_device

START_TIMEOUT_S = 300.0  # building the registry in a fresh worker (imports every plugin)


class WorkerDied(Exception):
    """The worker process ended (or had to be killed) before answering."""


def _exit_when_orphaned(supervisor_pid: int) -> None:
    """A daemon thread: end this worker (even mid-cell) once the supervisor is gone (e.g. kill -9)."""
    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(supervisor_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def serve(conn, plugins: list[str], config: RunConfig, out_dir: str, cwd: str, environ: dict,
          supervisor_pid: int) -> None:
    """The worker's loop: build the registry, then run each cell received until ``None``. The
    worker takes the supervisor's working directory and environment (the forkserver has the ones
    it started with), so relative paths and variables such as Inception weights mean the same."""
    from diffbench.nn.attention import use_backend
    from diffbench.plugins import build_registry

    _exit_when_orphaned(supervisor_pid)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    try:
        runner = GridRunner(build_registry(plugins), config, Path(out_dir), progress=False)
    except BaseException as exc:  # reported to the supervisor; it was already validated there
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    handler = logging.FileHandler(Path(out_dir) / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    conn.send(("ready", None))
    with use_backend(config.attention):
        while (cell := conn.recv()) is not None:
            conn.send(("result", runner.run_cell(cell)))


def _plugin_modules() -> list[str]:
    return sorted({ep.value.split(":")[0] for ep in entry_points(group="diffbench")})


def describe_exit(exitcode: int | None) -> str:
    """Why a worker ended, in words (a negative exit code is the signal that killed it)."""
    if exitcode is None:
        return "did not answer"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode} (a plugin called os._exit or the interpreter aborted)"


class Supervisor:
    """Runs cells in a worker process: ``run_cell(cell) -> CellResult`` like GridRunner's own."""

    def __init__(self, registry: Registry, config: RunConfig, out_dir: Path, *, plugins=(), cell_timeout_s: float):
        self.registry, self.config, self.out_dir = registry, config, Path(out_dir)
        self.plugins = [str(Path(p).resolve()) for p in plugins]
        self.cell_timeout_s = cell_timeout_s
        self.device = resolve_device(config.device)
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self._context.get_start_method() == "forkserver":
            self._context.set_forkserver_preload(["diffbench.worker", *_plugin_modules()])
        self._process = self._conn = None
        self._started = False

    def start(self) -> None:
        """Start a worker now (its start-up then overlaps with the supervisor's own work)."""
        if self._process is None:
            parent, child = self._context.Pipe()
            args = (child, self.plugins, self.config, str(self.out_dir.resolve()), os.getcwd(), dict(os.environ),
                    os.getpid())
            self._process = self._context.Process(target=serve, args=args, daemon=True)
            self._process.start()
            child.close()
            self._conn = parent
            self._started = False

    def _ready(self) -> None:
        self.start()
        if not self._started:
            kind, error = self._receive(START_TIMEOUT_S, "starting")
            if kind == "error":
                self.stop(kill=True)
                raise WorkerDied(f"could not start: {error}")
            self._started = True

    def _receive(self, timeout_s: float, doing: str):
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self.stop(kill=True)
                raise WorkerDied(f"took longer than --cell-timeout {timeout_s:g} s {doing}; the worker was "
                                 f"stopped and replaced")
            if not self._process.is_alive():
                break
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            exitcode = self._process.exitcode
            self.stop(kill=True)
            raise WorkerDied(f"{describe_exit(exitcode)} {doing}") from None

    def run_cell(self, cell: Cell) -> CellResult:
        try:
            self._ready()
            self._conn.send(cell)
            _, result = self._receive(self.cell_timeout_s, "in this cell")
            return result
        except WorkerDied as exc:
            row = base_row(self.config, cell, self.registry, self.device)
            row.update(status="failed", reason=f"worker process {exc} (model {cell.model.label!r}, sampler "
                                               f"{cell.sampler.label!r})")
            log.error("failed %s: %s", cell.slug, row["reason"])
            discard_samples(self.config, self.out_dir, cell)  # what the dead worker streamed
            return CellResult(row, {})

    def stop(self, kill: bool = False) -> None:
        """End the worker: politely when it is idle, else (``kill``, or it does not stop) kill it."""
        if self._process is None:
            return
        try:
            if not kill and self._process.is_alive() and self._started:
                self._conn.send(None)
                self._process.join(5)
        except (OSError, AttributeError):
            pass
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process = self._conn = None
