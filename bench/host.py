"""How fast the host was while a step was measured.

This machine is a VM on a shared host, and its speed drifts by half within an hour. Three
figures go with each sample, so a reader can tell a slow drydock from a slow host:
- the CPU time the hypervisor stole (/proc/stat) while the step ran;
- the CPU time spent idle waiting for the disk while it ran (iowait): drydock's steps read
  and write far more per second than the runbook's gzip, so a slow disk would slow them
  most (added after 2026-12-03T16:11Z, when a FILE_COPY of 1 GB took 3.2 s against 0.44 s
  at 13:07Z; at 17:09Z it took 3.8 s with 3% iowait: the slowness was not the disk's); and
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
# The cpu line's fields: user nice system idle iowait irq softirq steal.
IOWAIT = 4
STEAL = 7


def cpu_times(stat: Path = STAT) -> list[int]:
    """The machine's cumulative CPU time per state, in clock ticks (guest time is already in user)."""
    fields = stat.read_text().splitlines()[0].split()
    return [int(value) for value in fields[1:9]]


def share_percent(before: list[int], after: list[int], state: int = STEAL) -> float:
    """The share of all CPU time between two readings spent in `state` (steal by default)."""
    spent = [late - early for early, late in zip(before, after)]
    total = sum(spent)
    return round(100.0 * spent[state] / total, 1) if total else 0.0


class StolenCpu:
    """`with StolenCpu() as host: ...` then `host.percent`: the share of all CPU time in the
    block that the hypervisor stole; `host.iowait_percent`: the share spent waiting for the disk."""

    def __init__(self, stat: Path = STAT):
        self.stat = stat
        self.percent = self.iowait_percent = 0.0

    def __enter__(self) -> StolenCpu:
        self._before = cpu_times(self.stat)
        return self

    def __exit__(self, *exc) -> None:
        after = cpu_times(self.stat)
        self.percent = share_percent(self._before, after, STEAL)
        self.iowait_percent = share_percent(self._before, after, IOWAIT)


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
