"""What ``/proc`` says about the benchmark's processes: CPU seconds, children, names, peak
memory, and the CPU a phase cost each process per transaction."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far, all threads (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Child processes of any of ``pid``'s threads (litestream is started from one)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_name(pid: int) -> str:
    """The process's command name (``litestream``, ``nats-server``), or its pid."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class CpuMeter:
    """CPU seconds spent during a phase by the consumer (named ``name``: the scorer or the
    pass-through), each of its children (Litestream, the alert dispatcher) and the ``others``
    (nats-server), as microseconds per transaction. Created just before the phase; read
    with :meth:`per_transaction` just after. Unlike tx/s this hardly depends on what else
    the machine is doing, so two configurations can be compared on a busy machine too.
    /proc counts in clock ticks (10 ms), so a phase should take a few seconds."""

    def __init__(self, consumer: int, name: str, others: dict[str, int]) -> None:
        self.consumer, self.name, self.others = consumer, name, others
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        seen = {self.name: cpu_seconds(self.consumer)}
        for child in children(self.consumer):
            seen[process_name(child)] = cpu_seconds(child)
        for name, pid in self.others.items():
            seen[name] = cpu_seconds(pid)
        return seen

    def per_transaction(self, transactions: int) -> dict[str, float]:
        """µs of CPU per transaction of each process since this meter was created."""
        end = self._read()
        return {name: round((end[name] - self.start.get(name, 0.0)) * 1e6 / max(1, transactions))
                for name in end}
