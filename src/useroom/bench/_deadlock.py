"""The hard case, many times, side by side: who resolves an OOM from inside the group.

An *episode*: W workers are forked, moved into the group and released at once
("workers start"); each touches more memory than the group's limit, so each
must be killed. The episode ends at the first moment every worker has exited
and the group's ``under_oom`` reads 0; its *episode time* is that moment minus
"workers start". If some worker is still alive and the group is still under OOM
``deadlock_after`` seconds after the start, the episode is a *deadlock*: the
safety net re-enables the kernel OOM killer, lifts the limit and SIGKILLs the
workers. (Workers alive but the group not under OOM at that point is a slow
episode, not a deadlock: it gets as long again, and is a *stall* if it still has
not ended.)

A *block* is one fresh group, one handler process (if the variant has one)
and consecutive episodes in that group. Blocks of the variants are
interleaved, so drift of the machine touches every variant alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TextIO

import attrs

from useroom.bench._handlers import (
    HandlerProcess,
    HandlerReport,
    naive_argv,
    service_argv,
    standalone_argv,
)
from useroom.bench._sandbox import BenchError, Interrupted, Lab, ScratchGroup, SignalGuard
from useroom.bench._workers import spawn_crew

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "Block",
    "Config",
    "Episode",
    "Run",
    "Variant",
    "attribute_events",
    "check_available",
    "run",
]

_MS: Final = 1_000_000
#: Handler outcomes that mean the episode's OOM was dealt with.
_HANDLED: Final = frozenset({"resolved", "superseded"})
#: How often ``under_oom`` is read once every worker has exited (nothing announces it clearing).
_UNDER_OOM_POLL_S: Final = 0.0002
_RESCUE_TIMEOUT_S: Final = 10.0


@attrs.frozen
class Variant:
    """Who handles the OOM in an episode."""

    name: str
    #: The group's ``oom_kill_disable``.
    kill_disable: bool
    #: None (the kernel), "naive", "standalone" or "inprocess".
    handler: str | None
    #: A fresh group and handler for every episode instead of one per block.
    fresh_per_episode: bool
    description: str


VARIANTS: Final[dict[str, Variant]] = {
    variant.name: variant
    for variant in (
        Variant("kernel", False, None, False,
                "the kernel OOM killer (oom_kill_disable=0), no handler: the baseline"),
        Variant("naive", True, "naive", True,
                "oom_kill_disable=1; a plain Python handler in the group: eventfd, read cgroup.procs, kill"),
        Variant("useroom-standalone", True, "standalone", False,
                "oom_kill_disable=1; `python -m useroom handle --join` in the group, kill-largest"),
        Variant("useroom-inprocess", True, "inprocess", False,
                "oom_kill_disable=1; a Python service in the group running useroom.Handler in-process"),
        Variant("no-handler", True, None, True,
                "oom_kill_disable=1 and no handler at all: every episode must deadlock (checks the harness)"),
    )
}
#: What runs when no variant is named (no-handler only checks the harness itself).
DEFAULT_VARIANTS: Final = ("kernel", "naive", "useroom-standalone", "useroom-inprocess")
#: Variants whose episodes are expected to deadlock, so they run fewer of them.
_FEW_EPISODES: Final = frozenset({"naive", "no-handler"})


@attrs.frozen
class Config:
    """What to run; sizes in bytes, times in seconds."""

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    episodes: int = 100
    #: Episodes of the naive and no-handler variants (each deadlock costs ``deadlock_after``).
    naive_episodes: int = 20
    limit: int = 64 << 20
    workers: int = 4
    worker_size: int = 96 << 20
    #: The useroom handlers' reserve: headroom for acting on workers that
    #: started after the victim table's last refresh (0: none).
    reserve: int = 8 << 20
    deadlock_after: float = 5.0
    #: Episodes per block (per handler process) for the variants that keep one.
    block: int = 10
    naive_pick: str = "first"
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown or not self.variants:
            raise BenchError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        if self.worker_size <= self.limit:
            raise BenchError("each worker must touch more than the limit (--worker-size > --limit), "
                             "or an episode may end without any OOM")
        if self.episodes < 1 or self.naive_episodes < 0 or self.workers < 1 or self.block < 1:
            raise BenchError("--episodes, --workers and --block must be at least 1")
        if self.deadlock_after <= 0:
            raise BenchError("--deadlock-after must be positive")
        if self.naive_pick not in ("first", "largest"):
            raise BenchError("--naive-pick is 'first' or 'largest'")

    def episodes_of(self, variant: str) -> int:
        return self.naive_episodes if variant in _FEW_EPISODES else self.episodes


@attrs.define
class Episode:
    """One episode's raw figures (timestamps are CLOCK_MONOTONIC ns)."""

    variant: str
    index: int
    block: int
    group: str
    start_ns: int
    #: "resolved", "deadlock" or "stalled".
    outcome: str
    #: When every worker was gone and ``under_oom`` read 0 (None unless resolved).
    end_ns: int | None
    #: When the episode's window closed: ``end_ns``, or the end of the rescue.
    window_end_ns: int
    #: Per worker: exit time after start (ns), the signal that ended it, its exit code.
    worker_exit_ns: list[int | None]
    worker_signals: list[int | None]
    worker_codes: list[int | None]
    #: Increase of ``oom_kill`` in ``memory.oom_control``: kills by the kernel's OOM killer (before any rescue).
    kernel_kills: int
    #: Workers that had exited when the episode ended or was declared stuck (all of them if resolved).
    gone_before_rescue: int
    rescued: bool
    #: Filled from the handler's report once its block has ended. ``handler_resolved``: no rescue, no kernel
    #: kill, and the handler's events in the window say "resolved" (and nothing but "not_needed" besides).
    handler_events: int = 0
    handler_resolved: bool = False
    notify_to_signal_ns: list[int] = attrs.field(factory=list)

    @property
    def duration_ns(self) -> int | None:
        return None if self.end_ns is None else self.end_ns - self.start_ns


@attrs.define
class Block:
    """One group (and handler process) and the episodes run in it."""

    variant: str
    index: int
    group: str
    episodes: list[Episode] = attrs.field(factory=list)
    handler_pid: int | None = None
    #: Handler start to its ``ready`` line, ns.
    handler_ready_ns: int | None = None
    report: HandlerReport | None = None
    #: Events whose notification falls in no episode of the block.
    stray_events: int = 0
    problem: str | None = None


@attrs.define
class Run:
    """Everything one invocation measured."""

    config: Config
    machine: dict[str, Any]
    blocks: list[Block] = attrs.field(factory=list)
    #: The signal that cut the run short, if one did.
    interrupted: int | None = None
    problems: list[str] = attrs.field(factory=list)

    def episodes(self, variant: str) -> list[Episode]:
        return [episode for block in self.blocks if block.variant == variant for episode in block.episodes]


#: The variants that need v1's disabled kernel killer (nobody waits on v2).
V1_ONLY: Final = ("naive", "no-handler")


def default_variants(killer_switch: bool) -> tuple[str, ...]:
    """The default variants where the kernel killer has a switch (v1), or has none (v2)."""
    return tuple(name for name in DEFAULT_VARIANTS if killer_switch or name not in V1_ONLY)


def check_available(variants: tuple[str, ...], killer_switch: bool = True) -> list[str]:
    """Return, for each requested variant that cannot run here, why not (*killer_switch*: see
    :attr:`ScratchGroup.killer_switch`)."""
    reasons = []
    if not killer_switch:
        reasons += [f"{name}: needs cgroup v1's oom_kill_disable (on v2 nobody waits in an OOM)"
                    for name in variants if name in V1_ONLY]
    if "useroom-inprocess" in variants:
        try:
            useroom = importlib.import_module("useroom")
        except ImportError as err:
            reasons.append(f"useroom-inprocess: `import useroom` fails: {err}")
        else:
            missing = [name for name in ("Group", "Handler", "KillLargest") if not hasattr(useroom, name)]
            if missing:
                reasons.append(f"useroom-inprocess: `import useroom` has no {', '.join(missing)} yet "
                               "(the handler API is not there)")
    if "useroom-standalone" in variants:
        reason = _standalone_missing()
        if reason:
            reasons.append(f"useroom-standalone: {reason}")
    return reasons


def _standalone_missing() -> str | None:
    if importlib.util.find_spec("useroom.__main__") is None:
        return "`python -m useroom` does not exist yet (no useroom/__main__.py)"
    probe = subprocess.run([sys.executable, "-m", "useroom", "handle", "--help"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60, check=False)
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).decode(errors="replace").strip()[-500:]
        return f"`python -m useroom handle --help` exits with {probe.returncode}: {tail}"
    return None


def schedule(config: Config) -> Iterator[tuple[Variant, int]]:
    """Yield (variant, episodes) blocks round-robin, rotating the order each round."""
    left = {name: config.episodes_of(name) for name in config.variants}
    names = list(config.variants)
    round_ = 0
    while any(left.values()):
        rotation = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in rotation:
            variant = VARIANTS[name]
            size = 1 if variant.fresh_per_episode else config.block
            count = min(size, left[name])
            if count:
                left[name] -= count
                yield variant, count
        round_ += 1


def run(config: Config, machine: dict[str, Any], *, progress: TextIO, verbose: bool = False) -> Run:
    """Run every block of *config*; always leave no group and no process behind.

    SIGINT, SIGTERM and SIGHUP stop the run early (``Run.interrupted``) after the
    safety net has run; the figures gathered so far are kept.
    """
    result = Run(config, machine)
    failed: dict[str, str] = {}
    with SignalGuard() as guard, tempfile.TemporaryDirectory(prefix="useroom-bench.") as workdir:
        lab = Lab.below_own_memcg()
        for path in lab.sweep_stale():
            _say(progress, f"removed {path}, left by an earlier run that was killed")
        try:
            for number, (variant, count) in enumerate(schedule(config), 1):
                if variant.name in failed:
                    continue
                block = _run_block(lab, guard, config, variant, count, number,
                                   len(result.episodes(variant.name)) + 1, workdir, progress, verbose)
                result.blocks.append(block)
                _say(progress, _block_line(block))
                if block.problem and not block.episodes:
                    failed[variant.name] = f"block {block.index}"  # it would fail the same way every time
        except Interrupted as err:
            result.interrupted = err.signum
        finally:
            try:
                with guard.shielded():
                    lab.close()
            except Interrupted as err:
                result.interrupted = result.interrupted or err.signum
            result.problems.extend(lab.problems)
    for name, where in failed.items():
        result.problems.append(f"{name} was not run further: its {where} ran no episode (see that block)")
    return result


def _run_block(lab: Lab, guard: SignalGuard, config: Config, variant: Variant, count: int, number: int,
               first_index: int, workdir: str, progress: TextIO, verbose: bool) -> Block:
    group = lab.create_group(variant.name, limit=config.limit, kill_disable=variant.kill_disable)
    block = Block(variant.name, number, group.path)
    handler: HandlerProcess | None = None
    finished = False
    try:
        if variant.handler is not None:
            handler = _start_handler(lab, group, config, variant, number, workdir)
            block.handler_pid = handler.pid
            started = time.monotonic_ns()
            handler.wait_ready(group, config.ready_timeout)
            block.handler_ready_ns = (handler.ready_ns or started) - started
        for _ in range(count):
            if verbose:
                _say(progress, f"{variant.name}: episode starting in {group.path}")
            episode = _run_episode(lab, guard, group, config, variant, number, first_index + len(block.episodes))
            block.episodes.append(episode)
            if verbose:
                _say(progress, _episode_line(episode))
            if handler is not None:
                handler.drain()
                if not handler.alive():
                    block.problem = f"the handler exited during the block{_status_text(handler)}"
                    break
        finished = True
    except BenchError as err:
        block.problem = str(err)
    finally:
        with guard.shielded():
            if handler is not None:
                _stop_handler(lab, group, config, variant, handler, block, orderly=finished)
            lab.release(group)
    if block.report is not None:
        attribute_events(block)
    return block


def _start_handler(lab: Lab, group: ScratchGroup, config: Config, variant: Variant, number: int,
                   workdir: str) -> HandlerProcess:
    stderr_path = os.path.join(workdir, f"{number}.{variant.name}.stderr")
    events_path = os.path.join(workdir, f"{number}.{variant.name}.json")
    if variant.handler == "naive":
        return HandlerProcess.start(lab, naive_argv(group, config.naive_pick), stderr_path=stderr_path,
                                    events_path=None)
    if variant.handler == "standalone":
        argv = standalone_argv(group, events_path, config.reserve)
    else:
        argv = service_argv(group, events_path, config.reserve)
    return HandlerProcess.start(lab, argv, stderr_path=stderr_path, events_path=events_path)


def _stop_handler(lab: Lab, group: ScratchGroup, config: Config, variant: Variant, handler: HandlerProcess,
                  block: Block, *, orderly: bool) -> None:
    """Stop the handler with SIGTERM if the group is calm, else rescue first; then read its report."""
    stopped = False
    exited_early = not handler.alive()
    if orderly and not exited_early and not _under_oom(group):
        stopped = handler.stop(config.stop_timeout)
        if not stopped:
            block.problem = block.problem or f"the handler did not exit within {config.stop_timeout:g} s of SIGTERM"
    if not stopped:
        lab.rescue(group)
    handler.close()
    report = handler.report_from_stdout() if variant.handler == "naive" else handler.report_from_file()
    if report.problem and not stopped:
        why = "it had exited by itself" if exited_early else "it was killed by the safety net"
        report = attrs.evolve(report, problem=f"{report.problem} ({why}{_status_text(handler)})")
    block.report = report
    if report.problem and orderly and not block.problem:
        block.problem = f"no report from the handler: {report.problem}"


def _under_oom(group: ScratchGroup) -> bool:
    try:
        return group.under_oom()
    except OSError:
        return True


def _run_episode(lab: Lab, guard: SignalGuard, group: ScratchGroup, config: Config, variant: Variant,
                 number: int, index: int) -> Episode:
    before = group.oom_control()
    if before.under_oom:
        raise BenchError(f"{group.path} is under OOM before the episode starts")
    crew = spawn_crew(lab, group, guard, count=config.workers, size=config.worker_size,
                      ready_timeout=config.ready_timeout)
    after_ns = int(config.deadlock_after * 1e9)
    try:
        start = crew.release()
        end = _wait_resolved(crew.wait_all, group, start + after_ns)
        outcome = "resolved"
        if end is None:
            crew.reap_exited()
            if crew.alive() and _under_oom(group):
                outcome = "deadlock"
            else:
                end = _wait_resolved(crew.wait_all, group, start + 2 * after_ns)
                if end is None:
                    outcome = "stalled"
        window_end = end
        # Before any rescue: re-enabling the kernel killer lets it kill too.
        kernel_kills = group.oom_control().oom_kill - before.oom_kill
        crew.reap_exited()
        gone = len(crew.children) - len(crew.alive())
        if outcome != "resolved":
            with guard.shielded():
                _rescue_episode(lab, group, crew.alive(), config, variant)
            window_end = time.monotonic_ns()
    except BaseException:
        with guard.shielded():
            lab.rescue(group, crew.alive())
        raise
    finally:
        crew.close()
        for child in crew.children:
            lab.forget(child)
    assert window_end is not None
    return Episode(
        variant=variant.name, index=index, block=number, group=group.path,
        start_ns=start, outcome=outcome, end_ns=end if outcome == "resolved" else None,
        window_end_ns=window_end,
        worker_exit_ns=[None if c.exited_ns is None else c.exited_ns - start for c in crew.children],
        worker_signals=[c.killed_by for c in crew.children],
        worker_codes=[c.exit_code for c in crew.children],
        kernel_kills=kernel_kills,
        gone_before_rescue=gone,
        rescued=outcome != "resolved",
    )


def _rescue_episode(lab: Lab, group: ScratchGroup, alive: list[Any], config: Config, variant: Variant) -> None:
    """Free a stuck episode, then put the group back as it was for the block's next episode."""
    lab.rescue(group, alive)
    if _wait_cleared(group, time.monotonic_ns() + int(_RESCUE_TIMEOUT_S * 1e9)) is None:
        raise BenchError(f"{group.path} still under OOM {_RESCUE_TIMEOUT_S:g} s after the rescue")
    group.set_limit(config.limit)
    group.set_kill_disable(variant.kill_disable)


def _wait_resolved(wait_all: Callable[[int], bool], group: ScratchGroup, deadline_ns: int) -> int | None:
    """Wait until every worker has exited and ``under_oom`` reads 0; the moment it did, or None."""
    if not wait_all(deadline_ns):
        return None
    return _wait_cleared(group, deadline_ns)


def _wait_cleared(group: ScratchGroup, deadline_ns: int) -> int | None:
    while True:
        under = _under_oom(group)
        now = time.monotonic_ns()
        if not under:
            return now
        if now >= deadline_ns:
            return None
        time.sleep(_UNDER_OOM_POLL_S)


def attribute_events(block: Block) -> None:
    """Give each of the handler's events to the episode whose window holds its notification."""
    assert block.report is not None
    outcomes: dict[int, list[str]] = {id(episode): [] for episode in block.episodes}
    for event in block.report.events:
        notified = _int(event.get("notified_ns"))
        episode = next((e for e in block.episodes
                        if notified is not None and e.start_ns <= notified <= e.window_end_ns), None)
        if episode is None:
            block.stray_events += 1
            continue
        episode.handler_events += 1
        outcomes[id(episode)].append(outcome_name(event.get("outcome")))
        latency = notify_to_signal_ns(event)
        if latency is not None:
            episode.notify_to_signal_ns.append(latency)
    for episode in block.episodes:
        seen = outcomes[id(episode)]
        # The kernel killer acting (useroom's last resort) means the handler alone did not resolve it.
        episode.handler_resolved = (not episode.rescued and episode.kernel_kills == 0 and bool(set(seen) & _HANDLED)
                                    and all(outcome in _HANDLED | {"not_needed"} for outcome in seen))


def notify_to_signal_ns(event: dict[str, Any]) -> int | None:
    """From the notification to the first signal sent (the system call's
    entry), from one event record: the handler's own figure when it gives
    one, else the first signalling step's start (or end) time."""
    if "notify_to_signal_ns" in event:
        return _int(event.get("notify_to_signal_ns"))
    notified = _int(event.get("notified_ns"))
    if notified is None:
        return None
    for step in event.get("steps") or ():
        if isinstance(step, dict) and _is_signal_kind(step.get("kind")):
            t_ns = _int(step.get("started_ns", step.get("t_ns")))
            return None if t_ns is None else t_ns - notified
    return None


def outcome_name(value: Any) -> str:
    """An outcome as written by either handler ("RESOLVED", "Outcome.RESOLVED", "resolved") -> "resolved"."""
    return str(value).rsplit(".", 1)[-1].lower()


def _is_signal_kind(kind: Any) -> bool:
    if isinstance(kind, str):
        return outcome_name(kind).startswith("signal")
    if isinstance(kind, int) and not isinstance(kind, bool):
        try:
            from useroom.native import ActionKind
        except ImportError:
            return False
        return kind in (ActionKind.SIGNAL_PIDFD, ActionKind.SIGNAL_PID, ActionKind.SIGNAL_BEST)
    return False


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _status_text(handler: HandlerProcess) -> str:
    status = handler.child
    if status.killed_by is not None:
        return f" (killed by signal {status.killed_by})"
    if status.exit_code is not None:
        return f" (exit code {status.exit_code}){handler.tail_text()}"
    return ""


def _episode_line(episode: Episode) -> str:
    duration = episode.duration_ns
    shown = f"{duration / _MS:.1f} ms" if duration is not None else "rescued"
    return f"{episode.variant}: episode {episode.outcome}, {shown}, kernel kills {episode.kernel_kills}"


def _block_line(block: Block) -> str:
    outcomes = [episode.outcome for episode in block.episodes]
    durations = [d for e in block.episodes if (d := e.duration_ns) is not None]
    median = f", median {statistics.median(durations) / _MS:.1f} ms" if durations else ""
    problem = f"; problem: {block.problem}" if block.problem else ""
    return (f"block {block.index} {block.variant}: {len(outcomes)} episodes, "
            f"{outcomes.count('deadlock')} deadlocks{median}{problem}")


def _say(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)
