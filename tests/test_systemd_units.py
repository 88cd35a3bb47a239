"""The example units of ``examples/systemd``, run by a real systemd user manager.

.ci/run runs these in the systemd guest (tools/vm-run -S, tools/v2-delegated),
as a non-root user with a lingering user manager. Each unit is installed
as shipped, with a drop-in that changes only what this machine needs: the
interpreter and the package's path in ``ExecStart=``, a shorter
``WatchdogSec=``, and (for systemd before 254, which lacks
``MemoryPressureWatch=``) ``$MEMORY_PRESSURE_WATCH`` set by hand to a FIFO.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import useroom
from helpers import MIB, wait_until
from test_cgroup_v2 import EVENT_TIMEOUT
from useroom._units import UNLIMITED
from useroom.cgroup import Group

pytestmark = [pytest.mark.delegated, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "systemd"
PACKAGE_ROOT = str(Path(useroom.__file__).resolve().parents[1])
RUNTIME = Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}"))
UNIT_DIR = Path.home() / ".config" / "systemd" / "user"


def systemctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"systemctl --user {' '.join(args)}: {done.returncode}\n{done.stdout}{done.stderr}"
                             f"\n{journal(args[-1])}")
    return done.stdout.strip()


def journal(unit: str) -> str:
    done = subprocess.run(["journalctl", "--user", "-u", unit, "--no-pager", "-n", "40"], capture_output=True,
                          text=True, timeout=60)
    return done.stdout + done.stderr


def prop(unit: str, name: str) -> str:
    return systemctl("show", "-P", name, unit)


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=30).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))  # type: ignore[union-attr]


@pytest.fixture
def install() -> Iterator[object]:
    """``install(unit, dropin)``: the shipped unit and a drop-in; stopped and removed after."""
    installed: list[str] = []

    def put(unit: str, dropin: str) -> None:
        UNIT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLES / unit, UNIT_DIR / unit)
        (UNIT_DIR / f"{unit}.d").mkdir(exist_ok=True)
        (UNIT_DIR / f"{unit}.d" / "test.conf").write_text(dropin)
        installed.append(unit)
        systemctl("daemon-reload")

    yield put
    for unit in installed:
        systemctl("stop", unit, check=False)
        systemctl("reset-failed", unit, check=False)
        (UNIT_DIR / unit).unlink(missing_ok=True)
        shutil.rmtree(UNIT_DIR / f"{unit}.d", ignore_errors=True)
    systemctl("daemon-reload", check=False)


def test_useroom_handle_service(install, scratch_group: Group, spawn_hog) -> None:
    """``useroom-handle.service``: Type=notify starts once the handler is
    ready, STATUS= names the groups, WATCHDOG=1 keeps it alive past
    WatchdogSec, the hog is killed at the group's wall and logged to the
    events file, and a stop puts the group's settings back."""
    scratch_group.set_limit("64M")
    config = Path.home() / ".config" / "useroom"
    config.mkdir(parents=True, exist_ok=True)
    (config / "handle.env").write_text(f"USEROOM_GROUPS={scratch_group.path}\n")
    events = RUNTIME / "useroom" / "events.jsonl"
    install("useroom-handle.service", f"""[Service]
Environment=PYTHONPATH={PACKAGE_ROOT}
WatchdogSec=3s
ExecStart=
ExecStart={sys.executable} -m useroom handle --events %t/useroom/events.jsonl \
--metrics-textfile %t/useroom/useroom.prom $USEROOM_GROUPS
""")
    systemctl("start", "useroom-handle.service")  # returns once READY=1 arrived (Type=notify)
    unit = "useroom-handle.service"
    assert "active" == prop(unit, "ActiveState"), journal(unit)
    assert "handling 1 group" in prop(unit, "StatusText")
    assert scratch_group.high() < 64 * MIB, "the handler holds its wall"
    time.sleep(4.5)  # past WatchdogSec: alive only if WATCHDOG=1 came
    assert ("active", "0") == (prop(unit, "ActiveState"), prop(unit, "NRestarts")), journal(unit)

    hog = spawn_hog(96, scratch_group)
    hog.start()
    assert -9 == hog.wait(EVENT_TIMEOUT)
    assert wait_until(lambda: events.exists() and events.read_text().strip() != "", EVENT_TIMEOUT), journal(unit)
    episode = json.loads(events.read_text().splitlines()[0])
    assert hog.pid in [v["pid"] for v in episode["victims"]]
    assert wait_until(lambda: "1 kill" in prop(unit, "StatusText"), EVENT_TIMEOUT), prop(unit, "StatusText")
    assert 0 == scratch_group.events().oom_kill, "the handler killed it, not the kernel"
    assert "useroom_episodes_total" in (RUNTIME / "useroom" / "useroom.prom").read_text()

    systemctl("stop", unit)
    assert "inactive" == prop(unit, "ActiveState"), journal(unit)
    assert (UNLIMITED, 64 * MIB) == (scratch_group.high(), scratch_group.limit())


def test_useroom_cache_service(install) -> None:
    """``useroom-cache.service``: a service that imports useroom makes its
    group in the unit's delegated cgroup, runs inside it, and survives its
    OOMs (its hooks shed the cache); each signal of the memory pressure
    source systemd names runs its ``on_pressure`` hook."""
    unit = "useroom-cache.service"
    dropin = f"""[Service]
Environment=PYTHONPATH={PACKAGE_ROOT}
ExecStart=
ExecStart={sys.executable} {EXAMPLES / "cache_service.py"} --limit 64M --rate 400
"""
    fifo = None
    if systemd_version() < 254:
        # No MemoryPressureWatch= here: the variable systemd 254 would set, by hand.
        fifo = RUNTIME / "useroom-cache.pressure"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        dropin += f"Environment=MEMORY_PRESSURE_WATCH={fifo}\n"
    install(unit, dropin)
    status_file = RUNTIME / "useroom-cache" / "status.json"
    try:
        systemctl("start", unit)
        assert wait_until(status_file.exists, EVENT_TIMEOUT), journal(unit)

        def status() -> dict[str, object]:
            return json.loads(status_file.read_text())

        group = Group.open(prop(unit, "ControlGroup").rstrip("/") + "/cache")
        assert 64 * MIB >= group.limit() and os.stat(group.path).st_uid == os.getuid()
        if fifo is not None:
            assert str(fifo) == status()["pressure_watch"]
            with open(fifo, "w") as signal_it:
                signal_it.write("1")
            assert wait_until(lambda: status()["service_signals"] >= 1, EVENT_TIMEOUT), status()
        else:
            assert str(status()["pressure_watch"]).endswith("/useroom-cache.service/memory.pressure")
        # The cache outgrows the limit: the hooks shed it, nobody is killed.
        assert wait_until(lambda: status()["oom_hooks"] + status()["usage_signals"] >= 2, 60), status()
        assert 0 == status()["killed"] and "active" == prop(unit, "ActiveState"), journal(unit)
        systemctl("stop", unit)
        assert "inactive" == prop(unit, "ActiveState"), journal(unit)
        assert not os.path.exists(group.path), "systemd removed the service's groups"
    finally:
        if fifo is not None:
            fifo.unlink(missing_ok=True)
