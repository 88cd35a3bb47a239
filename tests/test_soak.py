"""The soak benchmark, short: a few turns of storms, hooks and start/stop cycles on the kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]


def test_a_short_soak_holds(tmp_path) -> None:
    """Twenty seconds of mixed rounds: every kind ran, the storms had episodes, and nothing the
    soak counts against useroom happened: no deadlock, takeover, kernel kill, hook service killed,
    zombie, thread drift, or fd or thread left behind after stop."""
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "useroom.bench", "soak", "--seconds", "20", "--quiet",
                           "--json", str(out)], capture_output=True, text=True, timeout=220)
    assert 0 == done.returncode, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert all(count >= 2 for count in result["rounds"].values()), result["rounds"]
    assert result["episodes"] > 0
    assert {"deadlocks": 0, "takeovers": 0, "kernel_kills": 0, "services_killed": 0, "zombies": 0} == \
        {key: result[key] for key in ("deadlocks", "takeovers", "kernel_kills", "services_killed", "zombies")}
    assert (0, {"fds": 0, "threads": 0}) == (result["drift"]["threads"], result["left"])
    assert "soak:" in done.stdout and "deadlocks" in done.stdout and "RSS drift, 2nd half" in done.stdout
    # The memory at the end of each turn, and its drift from the turn past half the run.
    turns = result["rss_kb_turns"]
    assert len(turns) == result["rounds"]["cycles"] and turns == sorted(turns)
    halfway = next(rss for at, rss in turns if at >= turns[-1][0] / 2)
    assert turns[-1][1] - halfway == result["rss_kb_second_half"]
