"""Degraded modes: recorded on the handler, logged once and warned once (DegradedWarning)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings

import pytest

from useroom import Degradation, DegradedWarning, Group, Handler

pytestmark = pytest.mark.kernel

#: In a fresh interpreter (memory locking changes the process for good): start a handler on the
#: group argv[1] with RLIMIT_MEMLOCK 0, and report what it recorded, logged and warned.
_NO_MEMLOCK = """
import json, logging, resource, sys, warnings
import useroom
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(getattr(record, "cause", None))
logging.getLogger("useroom").addHandler(Keep())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with useroom.Handler(useroom.Group.open(sys.argv[1]), thresholds=()) as handler:
        running = handler.supervisor.running
        locked = handler.hardening.locked_bytes
print(json.dumps({"degraded": [m.kind.value for m in handler.degraded], "running": running, "locked": locked,
                  "warned": [(w.category.__name__, str(w.message)) for w in caught], "logged": records}))
"""


def _warned(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DegradedWarning)]


class TestDegraded:
    def test_full_strength_here(self, scratch_group: Group) -> None:
        """As root on this kernel (pidfds, process_mrelease, CAP_IPC_LOCK) with the watchdog: no
        degraded mode, no warning."""
        scratch_group.set_limit("64M")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Handler(scratch_group, thresholds=()) as handler:
                pass
        assert ((), []) == (handler.degraded, _warned(caught))

    def test_no_memlock_starts_and_says_so_once(self, scratch_group: Group) -> None:
        """RLIMIT_MEMLOCK 0 without CAP_IPC_LOCK: the handler runs with nothing locked, and the
        partial lock is recorded, logged once and warned once."""
        scratch_group.set_limit("64M")
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed for this test"
        done = subprocess.run([setpriv, "--bounding-set", "-ipc_lock", sys.executable, "-c", _NO_MEMLOCK,
                               scratch_group.path], capture_output=True, text=True, timeout=60)
        assert 0 == done.returncode, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert (["partial_lock"], True) == (out["degraded"], out["running"])
        assert out["locked"] < 64 << 10
        assert ["partial_lock"] == [c for c in out["logged"] if c]
        [(category, message)] = out["warned"]
        assert "DegradedWarning" == category and message.startswith("memory only partly locked")

    @pytest.mark.parametrize("switch, kind, words", [
        ("useroom._fd.can_use_pidfd", Degradation.NO_PIDFD, "victims are signalled by pid"),
        ("useroom.native.can_use_mrelease", Degradation.NO_MRELEASE, "only as fast as it exits"),
    ])
    def test_missing_kernel_features(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture, switch: str, kind: Degradation,
                                     words: str) -> None:
        """Without pidfds or process_mrelease (kernels before 5.3 and 5.15): recorded on the
        handler, one warning record, one DegradedWarning."""
        monkeypatch.setattr(switch, False if switch.endswith("pidfd") else (lambda: False))
        caplog.set_level(logging.WARNING, logger="useroom")
        scratch_group.set_limit("64M")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Handler(scratch_group, thresholds=()) as handler:
                assert [kind] == [m.kind for m in handler.degraded]
        [message] = _warned(caught)
        assert words in message
        assert [kind.value] == [getattr(r, "cause") for r in caplog.records if hasattr(r, "cause")]

    def test_no_watchdog(self, scratch_group: Group) -> None:
        """watchdog=False: recorded with the groups it leaves unguarded."""
        scratch_group.set_limit("64M")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Handler(scratch_group, thresholds=(), watchdog=False) as handler:
                [mode] = handler.degraded
        assert (Degradation.NO_WATCHDOG, [scratch_group.relpath]) == (mode.kind, mode.fields["groups"])
        assert 1 == len(_warned(caught))

    def test_said_once_per_supervisor(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
        """A supervisor started twice warns about the same mode once."""
        from useroom import Supervisor

        monkeypatch.setattr("useroom._fd.can_use_pidfd", False)
        scratch_group.set_limit("64M")
        supervisor = Supervisor()
        supervisor.add(scratch_group, thresholds=())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with supervisor:
                    pass
        assert 1 == len(_warned(caught)) and 1 == len(supervisor.degraded)
