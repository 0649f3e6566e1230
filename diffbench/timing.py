"""Wall-clock and peak-memory measurement, and the environment fingerprint of a run."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), e.g. VmRSS or VmHWM; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_high_water_mark() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block in MiB above what was in use at entry: CUDA peak allocated, or on CPU
    the resident-set high-water mark (Linux: reset through /proc/self/clear_refs at entry, VmHWM at
    exit, so no spike is missed; elsewhere RSS polled every 2 ms by a thread)."""

    def __init__(self, device: torch.device, poll_s: float = 0.002):
        self.device, self.poll_s = device, poll_s
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._process = psutil.Process()
        self._base = self._peak = self._process.memory_info().rss
        self._high_water_mark = reset_rss_high_water_mark() and _proc_status_kib("VmHWM") is not None
        if not self._high_water_mark:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(self.poll_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return False
        if self._high_water_mark:
            self._peak = max(self._peak, 1024 * _proc_status_kib("VmHWM"))
        else:
            self._stop.set()
            self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20
        return False


@contextmanager
def wall_timer(device: torch.device, out: list[float]):
    """Append the block's wall-clock seconds to ``out`` (synchronising CUDA at both ends)."""
    synchronize(device)
    tic = time.perf_counter()
    yield
    synchronize(device)
    out.append(time.perf_counter() - tic)


def summarize(times: list[float]) -> tuple[float, float]:
    """(median, standard deviation) of repeated timings."""
    return statistics.median(times), (statistics.stdev(times) if len(times) > 1 else 0.0)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """Output of a git command in diffbench's source checkout, or None (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def git_commit_date(commit: str) -> str | None:
    """Committer date (ISO 8601) of a commit of diffbench's checkout ("-dirty" ignored), or None."""
    return _git("show", "-s", "--format=%cI", commit.removesuffix("-dirty"), "--") if commit else None


def environment_fingerprint(device: torch.device) -> dict:
    """Versions and hardware a result was measured with."""
    cuda = torch.cuda.is_available()
    commit = _git_commit()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffbench": _version("diffbench"),
        "torch_fidelity": _version("torch-fidelity"),
        "git_commit": commit,
        "git_commit_date": git_commit_date(commit),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda and device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
