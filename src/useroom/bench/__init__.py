"""Benchmarks of useroom against the kernel and a naive handler on the same workload.

``python -m useroom.bench deadlock`` runs the hard case many times in one
invocation: worker processes touch far more than a 64 MiB group's limit while
the OOM is handled by the kernel OOM killer, by a naive Python handler inside
the group, or by useroom's handler inside the group (as a standalone process
and inside a Python service). It prints one row per variant: episodes,
deadlocks, median and p99 episode time, the ratio to the kernel, and the
handler's notify-to-signal latency from its event records. See
``docs/benchmarks.md``.

It needs root (or a delegated v1 memory subtree) and creates its groups only
below the calling process's own memory cgroup.
"""
