"""Peak resident memory of a training run on CPU: a thread samples /proc/self/statm while the
loop runs, so the figure is the run's own high-water mark above the RSS before it started
(corpus and interpreter excluded), not the process-lifetime ru_maxrss. Where /proc is missing,
falls back to ru_maxrss (whole process)."""
from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """with PeakRSS() as meter: ...; meter.peak_mb (above the RSS at entry) and meter.total_mb."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.baseline, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20

    @property
    def total_mb(self) -> float:
        return self.peak / 2**20
