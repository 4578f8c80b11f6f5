"""cgroup v1 statistics as containerd's cgroups library reads them (CRI's ContainerStats and
ListPodSandboxStats take page faults from total_pgfault and total_pgmajfault)."""

from __future__ import annotations

from pathlib import Path

from kuasar.common import cgroups


def test_every_memory_stat_key_fills_its_field_and_the_swap_and_kernel_entries_are_read(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "memory.stat").write_text(
        "cache 1\nrss 2\npgpgin 3\npgfault 4\nhierarchical_memory_limit 5\nhierarchical_memsw_limit 6\n"
        "total_pgfault 7\ntotal_pgmajfault 8\ntotal_rss_huge 9\ntotal_unevictable 10\n")
    for name, value in (("memory.usage_in_bytes", 100), ("memory.limit_in_bytes", 200),
                        ("memory.memsw.usage_in_bytes", 300), ("memory.kmem.usage_in_bytes", 400),
                        ("memory.kmem.tcp.max_usage_in_bytes", 500)):
        (memory / name).write_text(f"{value}\n")
    stat = cgroups._v1_metrics({"memory": memory}).memory
    assert (stat.cache, stat.rss, stat.pg_pg_in, stat.pg_fault) == (1, 2, 3, 4)
    assert (stat.hierarchical_memory_limit, stat.hierarchical_swap_limit) == (5, 6)
    assert (stat.total_pg_fault, stat.total_pg_maj_fault, stat.total_rss_huge, stat.total_unevictable) == (7, 8, 9, 10)
    assert (stat.usage.usage, stat.usage.limit, stat.swap.usage, stat.kernel.usage, stat.kernel_tcp.max) == (
        100, 200, 300, 400, 500)
