#!/usr/bin/env python3
"""CPU used by processes outside a process group (other work on a shared benchmark machine).

  cpu_other.py wait PGID MAX_SHARE TIMEOUT_S   wait until the others use under MAX_SHARE (0-1)
                                               of the CPUs over 5 s; exit 1 after TIMEOUT_S
  cpu_other.py log PGID FILE                   every 2 s append "unix_time share top_commands"
  cpu_other.py mean FILE T0 T1                 the mean share logged in FILE between unix times
                                               T0 and T1 (a line covers the 2 s before its time)

share = CPU seconds of every process not in PGID (kernel threads included) / (seconds x CPUs),
from utime + stime in /proc/PID/stat.
"""
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def sample(pgid):
    """{pid: (cpu ticks, command)} of the processes outside pgid."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        # fields after the command: state ppid pgrp session ... utime(12) stime(13)
        if int(f[2]) == pgid:
            continue
        out[int(d)] = (int(f[11]) + int(f[12]), comm)
    return out


def share(pgid, seconds):
    a = sample(pgid)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = sample(pgid)
    dt = time.monotonic() - t0
    used = {}
    for pid, (ticks, comm) in b.items():
        # A process started in the interval spent all of its ticks in it; one that ended is lost.
        d = ticks - a[pid][0] if pid in a else ticks
        if d > 0:
            used[comm] = used.get(comm, 0) + d
    total = sum(used.values()) / TICK / (dt * NCPU)
    top = sorted(used.items(), key=lambda kv: -kv[1])[:3]
    return total, ",".join(f"{c}:{v / TICK / dt:.0%}" for c, v in top)


def mean(path, t0, t1):
    xs = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) >= 2 and t0 + 1 < float(p[0]) <= t1 + 1:
                xs.append(float(p[1]))
    return sum(xs) / len(xs) if xs else 0.0


def main():
    mode = sys.argv[1]
    if mode == "mean":
        print(f"{mean(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])):.3f}")
        return 0
    pgid = int(sys.argv[2])
    if mode == "wait":
        limit, timeout = float(sys.argv[3]), float(sys.argv[4])
        deadline = time.monotonic() + timeout
        while True:
            s, top = share(pgid, 5)
            if s < limit:
                return 0
            if time.monotonic() > deadline:
                print(f"other processes still use {s:.0%} of the CPUs ({top})", file=sys.stderr)
                return 1
            print(f"waiting: other processes use {s:.0%} of the CPUs ({top})", file=sys.stderr)
    elif mode == "log":
        with open(sys.argv[3], "a") as f:
            while True:
                s, top = share(pgid, 2)
                f.write(f"{time.time():.1f} {s:.3f} {top}\n")
                f.flush()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
