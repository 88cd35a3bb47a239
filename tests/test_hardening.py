"""Memory hardening, each case in a fresh interpreter (it changes the process for good)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import pytest


def _run(script: str, *, drop_ipc_lock: bool = False, memlock: int | None = None) -> dict:
    prefix = ""
    if memlock is not None:
        prefix = f"import resource\nresource.setrlimit(resource.RLIMIT_MEMLOCK, ({memlock}, {memlock}))\n"
    argv = [sys.executable, "-c", prefix + script]
    if drop_ipc_lock:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed for this test"
        argv = [setpriv, "--bounding-set", "-ipc_lock", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert 0 == out.returncode, out.stderr
    return json.loads(out.stdout)


_REPORT = """
import json, attrs, useroom
r = useroom.lock_memory(KWARGS)
print(json.dumps(attrs.asdict(r)))
"""


def _report(kwargs: str = "", **options) -> dict:
    return _run(_REPORT.replace("KWARGS", kwargs), **options)


class TestLockMemory:
    def test_default_locks_the_critical_set(self) -> None:
        """By default: the native core and the arena pool are locked, heap and
        stack prefaulted, the GC frozen, mlockall not attempted."""
        r = _report()
        assert False is r["mlockall"]
        assert r["core"]["image_size"] == r["core"]["locked"]
        assert r["pool"]["size"] == r["pool"]["locked"]
        assert 8 << 20 == r["heap_reserved"]
        assert 256 << 10 == r["stack_prefaulted"]
        assert True is r["gc_frozen"]
        assert True is r["raw_syscalls"]
        assert r["locked_bytes"] >= r["core"]["locked"] + r["pool"]["locked"]

    def test_mlockall_when_allowed(self) -> None:
        """With CAP_IPC_LOCK, mlockall=True locks the whole process."""
        r = _report("mlockall=True")
        assert (True, 0) == (r["mlockall"], r["mlockall_errno"])

    def test_mlockall_refusal_is_reported(self) -> None:
        """Without CAP_IPC_LOCK and with the default 8 MiB RLIMIT_MEMLOCK,
        mlockall is refused; the report says so and the critical set is still locked."""
        r = _report("mlockall=True", drop_ipc_lock=True, memlock=8 << 20)
        assert (False, errno.ENOMEM) == (r["mlockall"], r["mlockall_errno"])
        assert any("mlockall refused" in note for note in r["notes"])
        assert r["core"]["image_size"] == r["core"]["locked"]
        assert r["locked_bytes"] <= 8 << 20

    def test_pool_not_locked_beyond_the_limit(self) -> None:
        """A pool that does not fit in RLIMIT_MEMLOCK is prefaulted, not locked, and said so."""
        r = _report("pool='4M'", drop_ipc_lock=True, memlock=1 << 20)
        assert 0 == r["pool"]["locked"]
        assert any("pool prefaulted but not locked" in note for note in r["notes"])

    def test_bad_size(self) -> None:
        """A bad size raises InvalidSize before anything is changed."""
        out = subprocess.run(
            [sys.executable, "-c", "import useroom\ntry:\n useroom.lock_memory(heap='lots')\n"
             "except useroom.InvalidSize as e: print('InvalidSize')"],
            capture_output=True, text=True, timeout=60,
        )
        assert "InvalidSize" == out.stdout.strip()

    def test_idempotent(self) -> None:
        """A second call returns the same report and changes nothing."""
        r = _run("import json, useroom\na = useroom.lock_memory(); b = useroom.lock_memory()\n"
                 "print(json.dumps(a is b))")
        assert True is r

    def test_pymalloc_arenas_come_from_the_pool(self) -> None:
        """After hardening, new small objects live in arenas served by the prefaulted pool."""
        r = _run(
            "import json, useroom\nfrom useroom import native\n"
            "useroom.lock_memory(pool='4M')\n"
            "keep = [str(i) * 2 for i in range(200000)]\n"
            "p = native.pool_report()\n"
            "print(json.dumps([p.served, p.chunk, p.in_use]))"
        )
        served, chunk, in_use = r
        assert served >= 1
        assert 1 << 20 == chunk
        assert in_use >= 1


@pytest.mark.parametrize("size", ["0", "1M"])
def test_heap_reserve_sizes(size: str) -> None:
    """Any heap size, zero included, is accepted and reported."""
    r = _report(f"heap='{size}'")
    from useroom import parse_size

    assert parse_size(size) == r["heap_reserved"]
