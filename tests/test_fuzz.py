"""Fuzzed input for every parser of kernel text and of the watchdog protocol (hypothesis).

Each parser either returns a value or raises the one error it documents,
whatever it is given; and what the kernel (or the other end) writes is read
back as it was meant.
"""

from __future__ import annotations

import base64
import json
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from useroom._members import MembershipLine
from useroom._mounts import Mount, parse_mountinfo, parse_proc_cgroup
from useroom._victims import _StatusFields
from useroom.cgroup.v2 import MemoryEvents
from useroom.cgroup.values import OomControl, Stats
from useroom.exceptions import KernelFormatError, PressureWatchError
from useroom.handler.pressure import WATCH_VARIABLE, WRITE_VARIABLE, PressureWatch
from useroom.watchdog import protocol
from useroom.watchdog.protocol import GuardSpec, decode, decode_record

FUZZ = settings(max_examples=100, deadline=None)
#: Text as a file of the kernel's could hold it, and then some.
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=400)
KEYS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=24)
COUNTS = st.integers(min_value=0, max_value=2**63 - 1)
#: A field of mountinfo as it is before the kernel escapes it (space, tab, newline, backslash).
RAW_FIELD = st.text(alphabet=string.ascii_letters + string.digits + "/_.- \t\n\\", min_size=1, max_size=20)
#: proc(5)'s optional fields: "tag[:value]".
OPTIONAL = st.sampled_from(["shared", "master", "propagate_from"]).flatmap(
    lambda tag: st.integers(1, 999).map(lambda n: f"{tag}:{n}")) | st.just("unbindable")


def _escape(field: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


class TestKeyValueFiles:
    @FUZZ
    @given(st.dictionaries(KEYS, COUNTS, max_size=30))
    def test_memory_stat_round_trip(self, values: dict[str, int]) -> None:
        """``memory.stat`` as the kernel writes it reads back as written."""
        text = "".join(f"{k} {v}\n" for k, v in values.items())
        assert values == dict(Stats.from_text(text))

    @FUZZ
    @given(st.booleans(), st.booleans(), COUNTS, st.dictionaries(KEYS, COUNTS, max_size=5))
    def test_oom_control_round_trip(self, disabled: bool, under: bool, kills: int, extra: dict[str, int]) -> None:
        extra = {k: v for k, v in extra.items() if k not in ("oom_kill_disable", "under_oom", "oom_kill")}
        text = f"oom_kill_disable {int(disabled)}\nunder_oom {int(under)}\noom_kill {kills}\n"
        text += "".join(f"{k} {v}\n" for k, v in extra.items())
        assert OomControl(disabled, under, kills) == OomControl.from_text(text)

    @FUZZ
    @given(st.dictionaries(st.sampled_from(["low", "high", "max", "oom", "oom_kill", "oom_group_kill"]), COUNTS),
           st.dictionaries(KEYS, COUNTS, max_size=5))
    def test_memory_events_round_trip_and_new_keys(self, known: dict[str, int], unknown: dict[str, int]) -> None:
        """Known counters read back; keys a newer kernel adds are ignored."""
        unknown = {k: v for k, v in unknown.items() if k not in known and not hasattr(MemoryEvents(), k)}
        text = "".join(f"{k} {v}\n" for k, v in {**known, **unknown}.items())
        events = MemoryEvents.from_text(text)
        assert known == {k: getattr(events, k) for k in known}

    @FUZZ
    @given(TEXT)
    def test_anything_else_is_a_format_error(self, text: str) -> None:
        """Whatever the text, the three parse or raise KernelFormatError, never anything else."""
        for parse in (Stats.from_text, OomControl.from_text, MemoryEvents.from_text):
            try:
                parse(text)
            except KernelFormatError:
                pass


class TestProcFiles:
    @FUZZ
    @given(st.integers(0, 2**31), st.integers(0, 2**31), RAW_FIELD, RAW_FIELD,
           st.lists(OPTIONAL, max_size=3), st.sampled_from(["cgroup", "cgroup2", "ext4", "tmpfs"]), RAW_FIELD)
    def test_mountinfo_round_trip(self, mount_id: int, parent: int, root: str, point: str, optional: list[str],
                                  fstype: str, source: str) -> None:
        """A line of proc(5)'s shape, escapes and optional fields included, reads back field for field."""
        line = " ".join([str(mount_id), str(parent), "0:42", _escape(root), _escape(point), "rw,nosuid",
                         *optional, "-", fstype, _escape(source), "rw,memory"])
        [mount] = parse_mountinfo(line + "\n")
        assert Mount(mount_id, parent, "0:42", root, point, ("rw", "nosuid"), tuple(optional), fstype, source,
                     ("rw", "memory")) == mount

    @FUZZ
    @given(TEXT)
    def test_mountinfo_anything_else_is_a_format_error(self, text: str) -> None:
        try:
            parse_mountinfo(text)
        except KernelFormatError:
            pass

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 99), st.lists(KEYS, max_size=3),
                              st.text(alphabet=string.ascii_letters + "/-_.:", max_size=30)), max_size=8))
    def test_proc_cgroup_round_trip(self, lines: list[tuple[int, list[str], str]]) -> None:
        """``id:controllers:/path`` lines read back (a path may hold colons)."""
        text = "".join(f"{n}:{','.join(c)}:/{p}\n" for n, c, p in lines)
        parsed = parse_proc_cgroup(text)
        assert [(n, frozenset(c), "/" + p) for n, c, p in lines] == \
            [(m.hierarchy_id, m.controllers, m.path) for m in parsed]

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 99), st.lists(KEYS, max_size=3),
                              st.text(alphabet=string.ascii_letters + "/-_.:", max_size=30)), min_size=1, max_size=8),
           st.data())
    def test_membership_line_agrees_with_the_parser(self, lines: list[tuple[int, list[str], str]],
                                                    data: st.DataObject) -> None:
        """The check at each signal (a byte search for the group's line) says what the parser of
        ``/proc/<pid>/cgroup`` says: the task is in the group when one line is the group's."""
        text = "".join(f"{n}:{','.join(c)}:/{p}\n" for n, c, p in lines)
        n, c, p = data.draw(st.sampled_from(lines) | st.tuples(st.integers(0, 99), st.lists(KEYS, max_size=3),
                                                              st.text(alphabet="ab/", max_size=6)))
        line = MembershipLine(f"{n}:{','.join(c)}:/{p}\n".encode())
        assert len(parse_proc_cgroup(text)) == len(lines)  # well formed: one membership per line
        listed = {(n2, ",".join(c2), "/" + p2) for n2, c2, p2 in lines}
        assert line.holds(text.encode()) == ((n, ",".join(c), "/" + p) in listed)

    @FUZZ
    @given(TEXT)
    def test_proc_cgroup_anything_else_is_a_format_error(self, text: str) -> None:
        try:
            parse_proc_cgroup(text)
        except KernelFormatError:
            pass

    @FUZZ
    @given(st.binary(max_size=300))
    def test_status_never_raises(self, data: bytes) -> None:
        """A task's status file, however cut or garbled, is fields or None (then it is skipped)."""
        fields = _StatusFields.parse(data)
        assert fields is None or (fields.rss >= 0 or fields.rss < 0)

    @FUZZ
    @given(st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=15), st.integers(0, 2**40),
           st.integers(0, 2**32 - 1))
    def test_status_round_trip(self, comm: str, rss_kb: int, uid: int) -> None:
        text = f"Name:\t{comm}\nUmask:\t0022\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nVmRSS:\t{rss_kb} kB\n".encode()
        assert _StatusFields(comm.strip().encode(), rss_kb * 1024, uid) == _StatusFields.parse(text)


class TestPressureVariables:
    @FUZZ
    @given(st.dictionaries(st.sampled_from([WATCH_VARIABLE, WRITE_VARIABLE, "OTHER"]), TEXT))
    def test_any_environment_is_a_watch_none_or_a_clear_error(self, env: dict[str, str]) -> None:
        """systemd's variables, whatever they hold: a watch, None, or PressureWatchError naming one."""
        try:
            watch = PressureWatch.from_environment(env)
        except PressureWatchError as err:
            assert err.variable in (WATCH_VARIABLE, WRITE_VARIABLE)
        else:
            assert watch is None or watch.path == env[WATCH_VARIABLE]

    @FUZZ
    @given(st.text(alphabet=string.ascii_letters + "/._-", min_size=1, max_size=40), st.binary(max_size=64))
    def test_round_trip(self, path: str, data: bytes) -> None:
        env = {WATCH_VARIABLE: "/" + path, WRITE_VARIABLE: base64.b64encode(data).decode()}
        assert PressureWatch("/" + path, data) == PressureWatch.from_environment(env)


GUARDS = st.builds(GuardSpec, path=st.text(max_size=40), key=st.integers(-2**31, 2**31),
                   limit=st.none() | st.integers(0, 2**62), kill_enabled=st.none() | st.booleans(),
                   saved=st.none() | st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)))
MESSAGES = st.one_of(
    st.just(protocol.Beat()), st.just(protocol.Stop()), st.builds(protocol.Add, GUARDS),
    st.builds(protocol.Remove, st.text(max_size=40)),
    st.builds(protocol.SetLimit, st.text(max_size=40), st.integers(0, 2**62)),
    st.builds(protocol.LastResort, st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                                                   max_size=4)),
)


class TestWatchdogProtocol:
    @FUZZ
    @given(MESSAGES)
    def test_every_message_round_trips(self, message: protocol.Message) -> None:
        assert message == decode(message.encode())

    @FUZZ
    @given(st.binary(max_size=300) | st.sampled_from([b"add", b"remove", b"limit", b"last-resort"]).flatmap(
        lambda word: st.binary(max_size=100).map(lambda body: word + b" " + body)))
    def test_anything_else_raises_what_decode_says(self, data: bytes) -> None:
        """A packet that is no message raises ValueError, KeyError or TypeError (the watchdog logs
        it and goes on), never anything else."""
        try:
            decode(data)
        except (ValueError, KeyError, TypeError):
            pass

    @FUZZ
    @given(st.binary(max_size=300) | st.dictionaries(st.text(max_size=10), st.integers()).map(
        lambda d: json.dumps(d).encode()))
    def test_guard_specs_and_records(self, data: bytes) -> None:
        """A guard spec that is not one is a ValueError; a record that is not a JSON object is None."""
        try:
            GuardSpec.from_json(data)
        except ValueError:
            pass
        record = decode_record(data)
        assert record is None or isinstance(record, dict)
