"""A process's memory as Linux reports it in /proc/self/status, for the memory benchmarks (load_memory,
quant_load_memory, cpu_memory, cpu_17b; their child processes import it with the benchmarks folder on their path).
VmRSS: all resident pages; RssAnon: the process's own memory; RssFile: file pages it maps (memory-mapped weights,
page cache the kernel can drop); VmHWM: the resident peak the kernel kept. Linux only."""

from __future__ import annotations

import threading
import time

KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status(keys=KEYS) -> dict[str, int]:
    """Bytes of each of keys, from /proc/self/status's kB figures."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """`with PeakSampler(keys) as s:` (or start() ... stop()) samples status(keys) every `interval` seconds in a
    thread; s.peak holds each key's largest value, s.before the values when it was made."""

    def __init__(self, keys=("VmRSS", "RssAnon", "RssFile"), interval: float = 0.002):
        self.keys, self.interval = keys, interval
        self.before = status(keys)
        self.peak = dict(self.before)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            for key, value in status(self.keys).items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        for key, value in status(self.keys).items():  # what the last interval may have missed
            self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
