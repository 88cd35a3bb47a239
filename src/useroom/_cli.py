"""The ``useroom`` command: ``handle``, ``demo``, ``doctor``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import stat
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import attrs

from useroom import _log
from useroom._sdnotify import SystemdNotifier, watchdog_interval
from useroom.cgroup import Group
from useroom.handler import Handler, OomEvent, Supervisor
from useroom.handler.export import EventLog, MetricsFile, read_event_log
from useroom.policy import KillGroup, KillLargest, KillNewest, Policy, RaiseLimit
from useroom._units import format_size, parse_size
from useroom.watchdog import Takeover
from useroom.watchdog import main as watchdog_main
from useroom.exceptions import InvalidDuration, InvalidSize, OutputError, UseroomError
from useroom.handler import validate
from useroom.handler.history import DEFAULT_KEEP
from useroom.handler.validate import writable_path

__all__ = ["main"]

logger = logging.getLogger(__name__)

POLICIES: dict[str, type[KillLargest] | type[KillNewest] | type[KillGroup]] = {
    "kill-largest": KillLargest, "kill-newest": KillNewest, "kill-group": KillGroup,
}


def _policy(args: argparse.Namespace) -> Policy:
    if args.policy == "raise-limit":
        if not args.ceiling or not args.step:
            raise SystemExit("useroom: --policy raise-limit needs --step and --ceiling")
        return RaiseLimit(args.step, args.ceiling)
    return POLICIES[args.policy]()


def _handler_report(handler: Handler) -> dict[str, Any]:
    """The events kept (the newest --keep-events) and how many were dropped
    before them, the counters over every episode, and the errors kept."""
    history = handler.history
    return {
        "group": handler.group.relpath,
        "events": [e.to_dict() for e in history.events],
        "events_dropped": history.dropped,
        "counts": history.counts.to_dict(),
        "errors": [repr(e) for e in handler.errors],
        "errors_dropped": handler.errors.dropped,
    }


def _report(sup: Supervisor, handlers: list[Handler]) -> dict[str, Any]:
    """One group: its report with the process's figures; several: theirs in ``groups``."""
    process = {
        "locked_bytes": sup.locked_bytes,
        "hardening": attrs.asdict(sup.hardening) if sup.hardening else None,
    }
    if len(handlers) == 1:
        return {**_handler_report(handlers[0]), **process}
    return {**process, "groups": [_handler_report(h) for h in handlers],
            "errors": [repr(e) for e in sup.errors], "errors_dropped": sup.errors.dropped}


def _is_file(stream: IO[str] | None) -> bool:
    """Whether *stream* writes to a regular file (not a terminal, a pipe or a socket)."""
    try:
        return stream is not None and stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both OSError and ValueError
        return False


def written_each_episode(args: argparse.Namespace, level: int, log: IO[str] | None,
                         out: IO[str] | None) -> list[str]:
    """The regular files ``useroom handle`` writes after each episode: its
    log *log* if it logs INFO records, ``--events`` (``-``: *out*) and
    ``--metrics-textfile``."""
    files = []
    if level <= logging.INFO and _is_file(log):
        files.append("the log (stderr)")
    if args.events is not None and (args.events != "-" or _is_file(out)):
        files.append("--events " + args.events)
    if args.metrics_textfile is not None:
        files.append("--metrics-textfile " + args.metrics_textfile)
    return files


def warn_files_in_group(handlers: Sequence[Handler], files: list[str]) -> None:
    """Warns if this process is inside a group it handles and writes *files*
    there: their pages are charged to the group (to the group of the
    writer's process, wherever the file is), and at the limit the workers'
    reclaim meets them dirty. cgroup v1 then waits up to 100 ms for their
    writeback, each time (``reclaim_throttle``): in the deadlock benchmark
    one log line per episode in a file made episodes five times as long."""
    inside = next((h for h in handlers if h.inside()), None)
    if inside is None or not files:
        return
    logger.warning("this process is inside %s and writes %s after each episode: their pages are charged to the "
                   "group, and its reclaim at the limit waits for them to be written back; send the log to a "
                   "pipe, a terminal or the journal, or write these files from outside the group",
                   inside.group.relpath, ", ".join(files),
                   extra={"group": inside.group.relpath, "files": files, "cause": "files_in_group"})


def cmd_handle(args: argparse.Namespace) -> int:
    """Runs one supervisor for the GROUPs in this process until SIGTERM or SIGINT.

    The output paths were checked when the arguments were parsed, and the
    sizes when the handlers are made (before --join moves this process):
    bad input fails before anything starts. Whatever ends the run, what it
    collected goes out: to the files asked for, or, for a file that can no
    longer be written, to standard error (exit status 1; the same for
    --events lines that went there)."""
    level = _log.level_for(args.verbose, args.quiet)
    log_handler = _log.configure(level, args.log_format)
    groups = [Group.open(path) for path in args.groups]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(delay=args.delay, watchdog=not args.no_watchdog, watchdog_log=args.watchdog_log)
    log = EventLog(args.events) if args.events else None  # one log, every group's lines
    metrics = MetricsFile(args.metrics_textfile) if args.metrics_textfile else None
    # Made first: a size out of bounds fails before --join moves this process.
    handlers = [sup.add(group, _policy(args), reserve=args.reserve, event_log=log, keep_events=args.keep_events)
                for group in groups]
    if args.join:
        groups[0].attach(os.getpid())
    stream = log_handler.stream if isinstance(log_handler, logging.StreamHandler) else None
    warn_files_in_group(handlers, written_each_episode(args, level, stream, sys.stdout))
    started = False
    try:
        with sup:
            started = True
            _serve(handlers, metrics, stop)
    finally:
        delivered = not started or _deliver(args, sup, handlers, metrics)
    return 0 if delivered and not (log is not None and log.diverted) else 1


def _serve(handlers: list[Handler], metrics: MetricsFile | None, stop: threading.Event) -> None:
    written = -1
    systemd = SystemdNotifier()  # Type=notify: READY, STATUS, WATCHDOG, STOPPING
    beat = watchdog_interval()
    try:
        if metrics is not None:  # the collector finds the file from the moment it is ready
            _write_metrics(metrics, handlers)
            written = sum(h.history.total for h in handlers)
        print("ready", flush=True)
        systemd.send(READY=1, STATUS=_status(handlers))
        while True:
            count = sum(h.history.total for h in handlers)
            if count != written:  # an episode ended
                if metrics is not None:
                    _write_metrics(metrics, handlers)
                if written >= 0:
                    systemd.send(STATUS=_status(handlers))
                written = count
            if beat is not None:
                systemd.send(WATCHDOG=1)
            if stop.wait(0.5 if beat is None else min(0.5, beat)):
                break
        systemd.send(STOPPING=1)
    finally:
        systemd.close()


def _write_metrics(metrics: MetricsFile, handlers: list[Handler]) -> bool:
    """Replaces the metrics file; a failure is logged, never fatal (the next episode tries again)."""
    try:
        metrics.write((h.group.relpath, h.history.counts) for h in handlers)
    except OutputError as err:
        logger.error("%s", err, extra={"cause": "metrics_file", "path": metrics.path})
        return False
    return True


def _deliver(args: argparse.Namespace, sup: Supervisor, handlers: list[Handler], metrics: MetricsFile | None) -> bool:
    """At the end of the run: the last metrics and the report. A report that
    cannot be written goes to standard error, after the error, as one JSON
    line. False if anything could not be written where it was asked for."""
    ok = metrics is None or _write_metrics(metrics, handlers)
    if not args.events_out:
        return ok
    report = _report(sup, handlers)
    tmp = args.events_out + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(tmp, args.events_out)
        return ok
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"useroom: cannot write the report to {args.events_out}: {err.strerror}; "
              "here it is instead, on the next line", file=sys.stderr)
        print(json.dumps(report), file=sys.stderr, flush=True)
        return False


_WORKER = """\
import mmap, os, sys
os.read(0, 1)
size = int(sys.argv[1])
m = mmap.mmap(-1, size)
for off in range(0, size, 4096):
    m[off] = 1
"""


def _describe(event: OomEvent) -> str:
    def ms(ns: int | None) -> str:
        return "-" if ns is None else f"{ns / 1e6:8.3f} ms"

    act = None if event.acted_ns is None else event.acted_ns - event.notified_ns
    sig = event.notify_to_signal_ns
    lines = [
        f"episode {event.seq}: {event.outcome}"
        + (" (fallback)" if event.fallback else ""),
        f"  notified -> first action {ms(act)}, -> signal sent {ms(sig)}, -> OOM over {ms(event.duration_ns)}",
    ]
    for v in event.victims:
        lines.append(f"  {v.signal} {v.pid} ({v.name}, {format_size(v.rss)} RSS): "
                     f"{'ok' if v.result == 0 else os.strerror(-v.result)}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Makes a group below the caller's own, runs a handler inside it, causes
    real OOMs there, and prints what the native watcher did and how fast."""
    parent = Group.current()
    name = f"useroom-demo-{os.getpid()}"
    with parent.room_for_children(f"{name}-self"):
        return _demo(args, parent.create_child(name, memory_max=args.limit))


def _demo(args: argparse.Namespace, group: Group) -> int:
    workers: list[subprocess.Popen[bytes]] = []
    handler_proc: subprocess.Popen[str] | None = None
    out = tempfile.NamedTemporaryFile(prefix="useroom-demo-", suffix=".json", delete=False)
    out.close()
    try:
        print(f"group {group.relpath}: {group.limit_file} {format_size(group.limit())}; {group.handling}")
        handler_proc = subprocess.Popen(
            [sys.executable, "-m", "useroom", "handle", group.path, "--join", "--events-out", out.name, "-q",
             *(["--events", args.events] if args.events else []),
             *(["--metrics-textfile", args.metrics_textfile] if args.metrics_textfile else [])],
            stdout=subprocess.PIPE, text=True,
        )
        assert handler_proc.stdout is not None
        if handler_proc.stdout.readline().strip() != "ready":
            raise UseroomError("the handler did not start")
        print(f"handler {handler_proc.pid} runs inside the group")
        size = parse_size(args.size)
        for _ in range(args.workers):
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(size)], stdin=subprocess.PIPE)
            group.attach(proc.pid)
            workers.append(proc)
        print(f"{args.workers} workers in the group will each touch {format_size(size)}")
        start = time.monotonic()
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.write(b"g")
            proc.stdin.close()
        for proc in workers:
            proc.wait(timeout=args.timeout)
        elapsed = time.monotonic() - start
        handler_proc.send_signal(signal.SIGTERM)
        handler_proc.wait(timeout=30)
        with open(out.name, encoding="utf-8") as f:
            report = json.load(f)
        events = [OomEvent(**_event_fields(e)) for e in report["events"]]
        print(f"all workers gone after {elapsed * 1000:.1f} ms; kernel OOM kills={group.oom_control().oom_kill}; "
              f"handler locked {format_size(report['locked_bytes'])}")
        for event in events:
            if event.outcome != "not_needed":
                print(_describe(event))
        ignored = sum(e.outcome == "not_needed" for e in events)
        if ignored:
            print(f"({ignored} notification(s) arrived with the OOM already over and needed nothing)")
        return 0
    finally:
        group.set_oom_kill(True)  # in case the handler died before it put it back (v1)
        for proc in workers:
            proc.kill()
            proc.wait()
        if handler_proc is not None and handler_proc.poll() is None:
            handler_proc.kill()
            handler_proc.wait()
        group.remove(force=True)
        os.unlink(out.name)


def _event_fields(data: dict[str, Any]) -> dict[str, Any]:
    from useroom.handler import StepRecord, VictimRecord

    fields = {k: v for k, v in data.items() if k in attrs.fields_dict(OomEvent)}
    fields["victims"] = tuple(VictimRecord(**v) for v in data["victims"])
    fields["steps"] = tuple(StepRecord(**s) for s in data["steps"])
    if data.get("takeover"):
        fields["takeover"] = Takeover.from_dict(data["takeover"])
    return fields


def _status(handlers: Sequence[Handler]) -> str:
    """The one line ``systemctl status`` shows for ``useroom handle``."""
    counts = [h.history.counts for h in handlers]
    episodes, kills = sum(c.acted for c in counts), sum(c.kills for c in counts)
    return f"handling {len(handlers)} group(s): {episodes} episode(s), {kills} kill(s)"


def event_row(event: dict[str, Any]) -> str:
    """One episode of a log as a row of :func:`cmd_events`'s table."""
    def ms(ns: Any) -> str:
        return "-" if ns is None else f"{ns / 1e6:.3f}"

    killed = [str(v["pid"]) for v in event.get("victims", ()) if v.get("signal") == "SIGKILL" and v.get("result") == 0]
    return (f"{event.get('group', '?'):<32} {event.get('seq', '?'):>6} {event.get('outcome', '?'):<12} "
            f"{event.get('resolved_by') or '-':<8} {ms(event.get('notify_to_signal_ns')):>10} "
            f"{ms(event.get('duration_ns')):>10}  {','.join(killed) or '-'}")


EVENT_HEADER = f"{'group':<32} {'seq':>6} {'outcome':<12} {'by':<8} {'signal ms':>10} {'total ms':>10}  killed"


def _lines(file: Any, follow: bool) -> Iterator[str]:
    """The file's complete lines; following, it waits for more (a line being
    written shows once its newline is there)."""
    pending = ""
    while True:
        chunk = file.readline()
        if chunk:
            pending += chunk
            if pending.endswith("\n"):
                yield pending
                pending = ""
        elif not follow:
            if pending:
                yield pending
            return
        else:
            time.sleep(0.2)


def cmd_events(args: argparse.Namespace) -> int:
    """Prints an episode log as a table; with -f, follows it until interrupted."""
    try:
        file = sys.stdin if args.path == "-" else open(args.path, encoding="utf-8")  # closed below
    except OSError as err:
        raise UseroomError(f"cannot read the event log {args.path}: {err.strerror}") from err
    try:
        print(EVENT_HEADER, flush=True)
        for event in read_event_log(_lines(file, args.follow)):
            print(event_row(event), flush=True)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if file is not sys.stdin:
            file.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    """Reports what the calling user and this kernel allow; exits 0 when a handler can run."""
    from useroom._doctor import diagnose

    diagnosis = diagnose(args.group, measure=not args.no_measure)
    if args.json:
        json.dump(diagnosis.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(diagnosis.describe())
    return 0 if diagnosis.ready else 1


def installed_version() -> str:
    """The version of the installed distribution (its metadata), or the
    package's own ``__version__`` when it runs from a source tree."""
    try:
        return importlib.metadata.version("useroom")
    except importlib.metadata.PackageNotFoundError:
        from useroom import __version__

        return __version__


def _output_path(what: str, *, dash: bool = False) -> Any:
    """An argparse type: a path a file can be written to (``-`` for standard output if ``dash``)."""
    def check(text: str) -> str:
        if dash and text == "-":
            return text
        try:
            return writable_path(text, what)
        except OutputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return check


def _keep(text: str) -> int:
    """An argparse type: --keep-events, a whole number >= 0."""
    try:
        return validate.keep_events(int(text))
    except ValueError as err:
        if not text.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        raise argparse.ArgumentTypeError(str(err).replace("keep_events=", "--keep-events ")) from None


def _size(text: str) -> str:
    """An argparse type: a size (kept as given; its bounds are checked against the group)."""
    try:
        parse_size(text)
    except InvalidSize as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="useroom", description=__doc__)
    parser.add_argument("--version", action="version", version=f"useroom {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    handle = sub.add_parser("handle", help="run an OOM handler for one or more groups in this process")
    handle.add_argument("groups", nargs="+", metavar="GROUP",
                        help="a group: a cgroupfs path or a path in the memory hierarchy; one supervisor "
                             "(one watcher thread, one watchdog) serves them all")
    handle.add_argument("--join", action="store_true", help="move this process into the (first) group first")
    handle.add_argument("--policy", choices=[*POLICIES, "raise-limit"], default="kill-largest")
    handle.add_argument("--reserve", default=None, type=_size,
                        help="headroom grant size, e.g. 8M; at most the group's limit (for a group without one, "
                             "the machine's memory)")
    handle.add_argument("--step", default=None, type=_size,
                        help="raise-limit: step, e.g. 16M; at most the ceiling and the group's limit")
    handle.add_argument("--ceiling", default=None, type=_size,
                        help="raise-limit: ceiling, e.g. 512M; at most the machine's memory")
    handle.add_argument("--events-out", default=None, type=_output_path("the report"),
                        help="write the events as JSON here on exit (standard error if that fails then)")
    handle.add_argument("--events", default=None, metavar="PATH", type=_output_path("the event log", dash=True),
                        help="append each episode as a JSON line to PATH as it ends ('-': standard output)")
    handle.add_argument("--metrics-textfile", default=None, metavar="PATH", type=_output_path("the metrics file"),
                        help="keep Prometheus metrics in PATH (for the node exporter's textfile collector), "
                             "replaced atomically after each episode")
    handle.add_argument("--keep-events", default=DEFAULT_KEEP, type=_keep, metavar="N",
                        help="keep the newest N episodes of each group in full (default %(default)s; 0: none); "
                             "older ones are dropped and counted (events_dropped in --events-out), the "
                             "metrics count every episode")
    handle.add_argument("--delay", default="2s", help="the watchdog's delay (default %(default)s)")
    handle.add_argument("--watchdog-log", default=None, type=_output_path("the watchdog's log"),
                        help="the watchdog's JSON log file")
    handle.add_argument("--no-watchdog", action="store_true", help="run without the watchdog")
    loudness = handle.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log DEBUG records too (default: INFO)")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    handle.add_argument("--log-format", choices=_log.FORMATS, default="text",
                        help="the log's format on stderr: text, or one JSON object per line "
                             "(default %(default)s)")
    handle.set_defaults(func=cmd_handle)

    watchdog = sub.add_parser("watchdog", add_help=False,
                              help="guard groups: hand an OOM that outlasts --delay to the kernel "
                                   "(see useroom watchdog --help)")
    watchdog.add_argument("rest", nargs=argparse.REMAINDER)
    watchdog.set_defaults(func=lambda args: watchdog_main(args.rest))

    demo = sub.add_parser("demo", help="cause real OOMs in a fresh group and show them handled")
    demo.add_argument("--limit", default="64M")
    demo.add_argument("--workers", type=int, default=3)
    demo.add_argument("--size", default="160M", help="what each worker touches")
    demo.add_argument("--timeout", type=float, default=60.0)
    demo.add_argument("--events", default=None, metavar="PATH", type=_output_path("the event log", dash=True),
                      help="also append each episode as a JSON line to PATH (as useroom handle --events)")
    demo.add_argument("--metrics-textfile", default=None, metavar="PATH", type=_output_path("the metrics file"),
                      help="also keep Prometheus metrics in PATH (as useroom handle --metrics-textfile)")
    demo.set_defaults(func=cmd_demo)

    events = sub.add_parser("events", help="show an episode log (JSON lines, from --events) as a table",
                            description="Show the episodes of a log written by useroom handle --events (or "
                                        "Handler(event_log=...)), one row each; -f follows it as it grows.")
    events.add_argument("path", metavar="PATH", help="the log ('-': standard input)")
    events.add_argument("-f", "--follow", action="store_true", help="keep reading as episodes are appended")
    events.set_defaults(func=cmd_events)

    doctor = sub.add_parser(
        "doctor", help="what this user and kernel allow: delegation, memory locking, kernel features",
        description="Check, as the calling user, whether a handler can run for GROUP (default: your own "
                    "memory group) and say what to ask an administrator for. Exits 0 when it can, 1 when not.",
    )
    doctor.add_argument("group", nargs="?", default=None,
                        help="a cgroupfs path or a path in the memory hierarchy (default: your own group)")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument("--no-measure", action="store_true",
                        help="do not measure the locked set (it starts a fresh interpreter)")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["watchdog"]:
        return watchdog_main(argv[1:])  # its own parser, --help included
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (InvalidSize, InvalidDuration) as err:  # bad input, as argparse's errors: status 2
        print(f"useroom: {err}", file=sys.stderr)
        return 2
    except UseroomError as err:
        print(f"useroom: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a bad size or duration
        print(f"useroom: {err}", file=sys.stderr)
        return 2
