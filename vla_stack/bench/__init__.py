"""Benchmarks behind `vla-stack bench ...`: each returns a JSON-able dict; the CLI prints the table."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_PROC_STAT = Path("/proc/stat")
_PROC_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name and the widest vector ISA torch uses on it, e.g. "AMD EPYC (AVX2)": the same
    benchmark ran 2x slower on this project's AVX2 hosts than on its faster ones, so tables must name the host."""
    name = platform.processor() or platform.machine()
    try:
        for line in _PROC_CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        return f"{name} ({torch.backends.cpu.get_cpu_capability()})"
    except (ImportError, AttributeError):
        return name


def _cpu_ticks() -> list[int] | None:
    try:  # aggregate line: user nice system idle iowait irq softirq steal ...
        return [int(v) for v in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


class MachineLoad:
    """What the host took from this VM while a benchmark ran: CPU steal (time a hypervisor gave our vCPUs to
    someone else) and our own busy share, from /proc/stat (Linux; None elsewhere). On a shared VM latency
    follows steal more than code, so every latency table carries it.

        with MachineLoad() as load:
            ...
        load.summary()  # {"cpu_steal_pct": 23.1, "cpu_busy_pct": 48.0, "load_avg_1m": 1.3}
    """

    def __init__(self) -> None:
        self._start = self._end = None

    def __enter__(self) -> MachineLoad:
        self._start, self._end = _cpu_ticks(), None
        return self

    def __exit__(self, *exc) -> None:
        self._end = _cpu_ticks()

    def summary(self) -> dict:
        if self._start is None or self._end is None:
            return {"cpu_steal_pct": None, "cpu_busy_pct": None, "load_avg_1m": None}
        delta = [b - a for a, b in zip(self._start, self._end)]
        total = sum(delta) or 1
        idle = delta[3] + delta[4]
        return {"cpu_steal_pct": round(100 * delta[7] / total, 1),
                "cpu_busy_pct": round(100 * (total - idle - delta[7]) / total, 1),
                "load_avg_1m": round(os.getloadavg()[0], 2)}
