"""CPU and memory accounting of process trees, from /proc (through psutil)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psutil


def server_pids(supervisor_pid: int) -> list[int]:
    """The supervisor and all its descendants."""
    try:
        sup = psutil.Process(supervisor_pid)
        return [supervisor_pid, *(p.pid for p in sup.children(recursive=True))]
    except psutil.Error:
        return []


def cpu_seconds(pids: Iterable[int]) -> dict[int, tuple[float, float]]:
    """(utime, stime) of each process that still exists (psutil reads /proc/<pid>/stat)."""
    out: dict[int, tuple[float, float]] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = (t.user, t.system)
    return out


def used(
    before: Mapping[int, tuple[float, float]],
    after: Mapping[int, tuple[float, float]],
    pid: int,
    part: int | None = None,
) -> float:
    """CPU-seconds `pid` used between two `cpu_seconds` samples (user+system, or one part)."""
    a, b = before[pid], after[pid]
    if part is None:
        return (b[0] + b[1]) - (a[0] + a[1])
    return b[part] - a[part]


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle, all cores together (from /proc/stat)."""
    t = psutil.cpu_times()
    return float(
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


def rss_bytes(pids: Iterable[int]) -> dict[int, int]:
    """Resident set size of each process that still exists (summing them counts pages
    shared between forked processes more than once: an upper bound)."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            continue
    return out


MEMORY_KINDS = ("rss", "pss", "anon", "file", "shmem")


def memory_bytes(pid: int) -> dict[str, int] | None:
    """One process's memory by kind, from Linux's /proc/PID/smaps_rollup and status:

    - rss: resident pages (a page shared with other processes counts in full);
    - pss: proportional set size (a page shared by k processes counts 1/k in
      each), so a tree's sum counts each of its pages once, copy-on-write
      copies included;
    - anon / file / shmem: rss split into anonymous memory (the heap: what
      connections allocate), file pages (shared libraries' code, already in
      memory for the processes that mapped them before) and shared memory.

    None when the process is gone; only rss (psutil's) without /proc."""
    try:
        kinds = dict.fromkeys(MEMORY_KINDS, 0)
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss"):
                    kinds[name.lower()] = int(rest.split()[0]) * 1024
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "RssFile", "RssShmem"):
                    kinds[name[3:].lower()] = int(rest.split()[0]) * 1024
        return kinds
    except (OSError, ValueError, IndexError):
        pass
    try:
        return {"rss": int(psutil.Process(pid).memory_info().rss)}
    except psutil.Error:
        return None


def tree_memory_bytes(pids: Iterable[int]) -> dict[str, int]:
    """`memory_bytes` summed over the processes that still exist (kinds that some
    process could not give are left out)."""
    total = dict.fromkeys(MEMORY_KINDS, 0)
    missing: set[str] = set()
    for pid in pids:
        kinds = memory_bytes(pid)
        if kinds is None:
            continue
        for k in MEMORY_KINDS:
            if k in kinds:
                total[k] += kinds[k]
            else:
                missing.add(k)
    return {k: v for k, v in total.items() if k not in missing}
