"""Helpers shared by the benchmark scripts: peak-memory sampling and markdown tables."""

from __future__ import annotations

import threading
import time

import psutil

from gtakit.reporting import markdown_table  # noqa: F401  (re-exported for the scripts)


class PeakRSS:
    """Context manager sampling this process's resident memory; `.peak_mb` after exit."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, psutil.Process().memory_info().rss / 2**20)
