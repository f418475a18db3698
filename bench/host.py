"""How fast the host was while a step was measured.

This machine is a VM on a shared host, and its speed drifts by half within an hour. Two
figures go with each sample, so a reader can tell a slow drydock from a slow host:
- the CPU time the hypervisor stole (/proc/stat) while the step ran; and
- how long one core took, just before the step, to gzip a fixed text (the runbook's
  bottleneck): the host can get slower with no steal reported (2026-12-03: the same
  runbook pull took 126 s, then 190 s with 0% stolen)."""
from __future__ import annotations

import functools
import random
import time
import zlib
from pathlib import Path

STAT = Path("/proc/stat")
STEAL = 7  # user nice system idle iowait irq softirq steal: the eighth field of the cpu line


def cpu_times(stat: Path = STAT) -> list[int]:
    """The machine's cumulative CPU time per state, in clock ticks (guest time is already in user)."""
    fields = stat.read_text().splitlines()[0].split()
    return [int(value) for value in fields[1:9]]


def stolen_percent(before: list[int], after: list[int]) -> float:
    spent = [late - early for early, late in zip(before, after)]
    total = sum(spent)
    return round(100.0 * spent[STEAL] / total, 1) if total else 0.0


class StolenCpu:
    """`with StolenCpu() as host: ...` then `host.percent`: the share of all CPU time in the
    block that the hypervisor stole."""

    def __init__(self, stat: Path = STAT):
        self.stat = stat
        self.percent = 0.0

    def __enter__(self) -> StolenCpu:
        self._before = cpu_times(self.stat)
        return self

    def __exit__(self, *exc) -> None:
        self.percent = stolen_percent(self._before, cpu_times(self.stat))


@functools.lru_cache(maxsize=1)
def _prose(size: int = 2 << 20) -> bytes:
    """A fixed, prose-like text: the same bytes in every run, compressible like page bodies."""
    words = ("the page revision body of a blog post about wagtail and django with long prose "
             "paragraphs written by editors who publish on their own servers").split()
    chooser = random.Random(0)
    text = " ".join(chooser.choice(words) for _ in range(size // 4)).encode()
    return text[:size]


def gzip_check_s() -> float:
    """Seconds one core takes to gzip (level 6) a fixed 2 MiB text (0.17-0.30 s in one bench here)."""
    text = _prose()
    started = time.perf_counter()
    zlib.compress(text, 6)
    return round(time.perf_counter() - started, 3)
