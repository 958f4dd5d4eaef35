"""The CPUs the job counts: affinity, capped by a container's quota."""

from __future__ import annotations

import os

import pytest

from batch_caption.core.cpus import available_cpus, cgroup_cpu_quota


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({}, None),  # no cgroup files (not Linux, or not mounted)
])
def test_a_containers_cpu_quota_caps_the_cpus_counted(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(str(tmp_path)) == quota
    cpus = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == (min(cpus, quota) if quota else cpus)
