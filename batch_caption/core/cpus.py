"""How many CPUs this process may use: its affinity mask, capped by a container's quota."""

from __future__ import annotations

import os


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the CPUs it may run on (its affinity mask, where the OS
    has one), fewer under a container's CPU quota (docker --cpus, Kubernetes limits),
    which the affinity mask does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, quota)) if quota else cpus


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this process's cgroup (v2 cpu.max, or v1 cpu.cfs_quota_us over
    cpu.cfs_period_us) rounded up to whole CPUs; None without a quota or a cgroup."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)  # "max" (v2) -> ValueError: no quota
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 says -1 for none
        return None
    return -(-quota_us // period_us)
