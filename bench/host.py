"""How much CPU the host took away while a step was measured.

This machine is a VM on a shared host: when the hypervisor runs someone else on our cores
(steal time, in /proc/stat), whatever we measure at that moment takes longer. drydock
keeps both cores busy and feels it more than the runbook's single gzip does, so a busy
minute can move one pair's ratio by a third. Each sample records the stolen share, so a
reader can tell a slow drydock from a busy host."""
from __future__ import annotations

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
