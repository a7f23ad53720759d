"""Small helpers shared by the benchmark scripts: peak memory of a process tree, timing."""

from __future__ import annotations

import os
import threading
import time

import psutil


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _total(self) -> int:
        me = psutil.Process(os.getpid())
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self._total()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._total())

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30
