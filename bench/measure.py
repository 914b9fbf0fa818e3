"""Measuring another process and summing up samples: CPU time, peak RSS, percentiles, medians.

Owns how the benchmark reads a process's cost from ``/proc`` and how it reduces numbers. CPU
time comes from ``/proc/PID/task/*/schedstat`` (the scheduler's on-CPU nanoseconds, user and
system together, per thread), which is exact where ``/proc/PID/stat``'s utime and stime count
10 ms clock ticks; the ticks are the fallback on a kernel without schedstats. Peak RSS is the
kernel's high-water mark, ``VmHWM`` of ``/proc/PID/status``. Reading either does not disturb
the process. ``Load`` tells how busy the machine was with work other than the benchmark's:
the busy time of all CPUs (``/proc/stat``) less the CPU time of this process and of every
descendant it has reaped. Nothing here starts or stops processes.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int:
    """Return the CPU time ``pid`` has used so far, all its threads, in nanoseconds.

    Raises OSError if the process is gone (or a zombie whose statistics are gone).
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise
        return _cpu_ticks_ns(pid)
    return total


def _cpu_ticks_ns(pid: int) -> int:
    """utime + stime of ``/proc/PID/stat`` (fields 14 and 15), in nanoseconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_NS


def peak_rss_bytes(pid: int) -> int:
    """Return the largest resident set ``pid`` has had (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM in /proc/{pid}/status")


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (0 to 1) of sorted samples, nearest rank; nan if none."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float | None]) -> float | None:
    """Return the median of the values that are not None or nan, or None if there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else None


@dataclass(frozen=True)
class LoadSample:
    """CPU counters of the whole machine and of this process tree at one instant."""

    at: float  # time.monotonic()
    busy_s: float  # all CPUs: user, nice, system, irq, softirq, steal
    steal_s: float  # time the hypervisor gave our virtual CPUs to someone else
    ours_s: float  # this process and its reaped descendants, user and system


def sample_load() -> LoadSample:
    """Read the machine's and this process tree's CPU counters now."""
    with open("/proc/stat", "rb") as f:
        fields = [int(value) for value in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (proc(5)); guest time
    # is already inside user.
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    tick = _TICK_NS / 1e9
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    return LoadSample(time.monotonic(), busy * tick, fields[7] * tick, ours)


def other_load(start: LoadSample, end: LoadSample) -> dict[str, float]:
    """Return the CPUs' share used by other work, and stolen, between two samples (0 to 1)."""
    capacity = (end.at - start.at) * (os.cpu_count() or 1)
    if capacity <= 0:
        return {"other_cpu_share": math.nan, "steal_share": math.nan}
    stolen = end.steal_s - start.steal_s
    others = (end.busy_s - start.busy_s) - stolen - (end.ours_s - start.ours_s)
    return {
        "other_cpu_share": max(0.0, others) / capacity,
        "steal_share": stolen / capacity,
    }
