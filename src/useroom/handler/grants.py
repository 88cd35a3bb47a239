"""The headroom grant: what a group's handler does from Python while the
plan holds the limit raised by the reserve.

When the planned victims were not enough, the watcher raises the limit by
the reserve (the tasks asleep in the OOM wake and the handler's threads can
allocate again), writes the grant's eventfd and waits for the reply. The
manager answers with :meth:`Grants.grant`: it refreshes the victim table (a
task forked since the last refresh is not in the plan), kills by policy
until the limit can be restored (other tasks may take what one victim
freed), and replies; the plan then restores the limit. What it did becomes
part of the episode's event (:meth:`Grants.take_actions`).
"""

from __future__ import annotations

import errno
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from useroom import native
from useroom._members import MembershipLine
from useroom._procs import SpareProcs
from useroom._victims import Victim, VictimTable
from useroom.cgroup import Group
from useroom.handler.arming import Arming
from useroom.handler.events import VictimRecord
from useroom.handler.history import Recent
from useroom.handler.signals import GroupSignals
from useroom.native import EventFd
from useroom.policy import FreezeAndDecide, FrozenContext, Policy

__all__ = ["Grants"]


class Grants:
    """The grants of one group's handler: their eventfds (the plan's wake
    and the handler's reply), the spare ``cgroup.procs`` fd for a refresh
    that fails for want of memory, and what the handler did during the
    grants of the episode in progress.

    ``arming`` judges the fit; ``check_timeout`` bounds each wait for a
    victim's exit; ``note`` and ``errors`` are the handler's (an error a
    ``decide()`` callback raised, a choice it made that is no task of the
    group); ``last_resort`` is called when nothing is left to kill and the
    usage does not fit.
    """

    _table: VictimTable

    def __init__(
        self,
        group: Group,
        policy: Policy,
        arming: Arming[Any],
        *,
        check_timeout: float,
        note: Callable[[BaseException], None],
        errors: Recent[BaseException],
        last_resort: Callable[[], None],
        member: MembershipLine,
    ) -> None:
        self.group = group
        self.policy = policy
        self._arming = arming
        self._check_timeout = check_timeout
        self._note = note
        self._errors = errors
        self._last_resort = last_resort
        #: What the handler signalled from Python since the last event took them.
        self.actions: list[VictimRecord] = []
        self._wake: EventFd | None = None
        self._reply: EventFd | None = None
        self._spare = SpareProcs(group)
        self._member = member
        self._signals: GroupSignals | None = None

    def open(self, table: VictimTable) -> None:
        """Opens the grant's eventfds; ``table`` is the handler's victim table."""
        self._table = table
        self._signals = GroupSignals(table, self._member)
        self._wake = EventFd()
        self._reply = EventFd()

    def close(self) -> None:
        self._spare.close()
        for fd in (self._reply, self._wake):
            if fd is not None:
                fd.close()

    @property
    def signals(self) -> GroupSignals:
        """How the handler signals the group's tasks from Python."""
        assert self._signals is not None, "opened"
        return self._signals

    @property
    def wake(self) -> EventFd:
        """The eventfd the plan writes when it grants headroom."""
        assert self._wake is not None, "opened"
        return self._wake

    @property
    def reply(self) -> EventFd:
        """The eventfd the handler writes when it is done."""
        assert self._reply is not None, "opened"
        return self._reply

    def take_actions(self) -> list[VictimRecord]:
        """What the handler signalled during grants since the last call."""
        actions, self.actions = self.actions, []
        return actions

    def grant(self) -> None:
        """With headroom granted: refresh, kill by policy from Python until
        the limit can be restored (other tasks may take what one victim
        freed), then reply."""
        self.wake.read()
        try:
            try:
                self._table.refresh()
            except OSError as err:
                if err.errno != errno.ENOMEM:
                    raise
                # The woken tasks took the headroom before this thread could
                # open /proc: act with what needs no new file.
                self.kill_unseen()
                return
            if isinstance(self.policy, FreezeAndDecide):
                self._decide(self.policy)
                return
            killed = False
            for victim, _ in self.policy.order(self._table.victims):
                pidfd = self._table.pidfd(victim.pid)
                if pidfd is not None and pidfd.exited:
                    continue
                if self._kill_now(victim, self.policy.signal) != 0:
                    continue
                killed = True
                # Its memory comes back when it has exited: judge the fit
                # then, or the next victim dies for memory already freed.
                if self._arming.limit_fits() or (self._exited(victim) and self._arming.limit_fits()):
                    break
            if not killed and not self._arming.limit_fits():
                self._last_resort()
        finally:
            self.reply.write(1)

    def kill_unseen(self) -> None:
        """Kill the tasks no refresh has seen (the newest first), then the
        table's live ones in policy order, until the limit fits.

        Runs when the refresh failed with ENOMEM. The tasks come from the
        spare ``cgroup.procs`` fd (:class:`~useroom._procs.SpareProcs`,
        opened and read at a refresh: a read now reuses its buffer), and
        the fit is tried through the open limit fd. Each signal goes through
        :class:`~useroom.handler.signals.GroupSignals`: through a pidfd,
        once the task's cgroup file says it is still in the group. For a
        task the table knows, both are open already. For one it does not,
        they are opened now; where that fails for want of memory, the task
        list stands in for its cgroup file if it is of now, for the first
        signal only: after a kill and the wait for its memory, it is old,
        and such tasks are passed over (the table's, then the last resort,
        remain).
        """
        listing = self._spare.read()
        pids, listed = listing if listing is not None else ([], False)
        table = self._table
        known = {v.pid: v for v in table.victims}
        skip = table.protect | table.dying
        unseen = sorted((p for p in pids if p not in known and p not in skip), reverse=True)
        # The table's tasks need no list: their pidfds and cgroup files are open.
        ranked = [v.pid for v, _ in self.policy.order(table.victims) if v.pid not in skip]
        deadline_step = self._check_timeout
        # A list of now stands in for a task's cgroup file, for the first
        # signal only: after a kill and the wait for its memory, it is old.
        for pid in [*unseen, *ranked]:
            victim = known.get(pid)
            result = self.signals.send(pid, signal.SIGKILL, listed=listed)
            listed = listed and result != 0
            self.actions.append(VictimRecord(pid, victim.name if victim else "?", victim.rss if victim else 0,
                                             "SIGKILL", result, "handler", unrefreshed=True))
            if result != 0:
                continue
            table.dying.add(pid)
            deadline = time.monotonic() + deadline_step
            while True:
                if self._arming.limit_fits():
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.001)  # the victim is exiting: its memory comes back
        # Nobody left to kill from here and the usage does not fit: the
        # kernel's killer, not an episode left "relieved" with the limit raised.
        if not self._arming.limit_fits():
            self._last_resort()

    def _decide(self, policy: FreezeAndDecide) -> None:
        """The group is stopped: ask the user's callback whom to kill."""
        victims = {v.pid: v for v in self._table.victims}
        ctx = FrozenContext(tuple(victims.values()), self.group.usage(), self._arming.limit)
        try:
            chosen = list(policy.decide(ctx))
        except Exception as err:  # noqa: BLE001 - the user's decide(): recorded, the plan carries on
            self._note(err)
            return
        killed = []
        for pid in chosen:
            victim = victims.get(pid)
            pidfd = self._table.pidfd(pid)
            if victim is None or pidfd is None:
                self._errors.append(ValueError(f"decide() chose {pid}, which is not a task of the group"))
                continue
            if self._kill_now(victim, signal.SIGKILL) == 0:
                killed.append(pidfd)
        # The plan restores the limit once this returns: let the memory come back first.
        deadline = time.monotonic() + self._check_timeout
        for pidfd in killed:
            select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))

    def _kill_now(self, victim: Victim, sig: int) -> int:
        """Signals a victim from Python (headroom granted), reaps its memory
        after SIGKILL, and records it; returns 0 or -errno."""
        result = self.signals.send(victim.pid, sig)
        pidfd = self._table.pidfd(victim.pid)
        if result == 0 and pidfd is not None and native.can_use_mrelease() and sig == signal.SIGKILL:
            try:
                native.mrelease(pidfd.fileno())
            except OSError:
                pass  # it exited already: its memory is back
        self.actions.append(VictimRecord(victim.pid, victim.name, victim.rss, signal.Signals(sig).name,
                                         result, "handler"))
        if result == 0 and sig == signal.SIGKILL:
            self._table.dying.add(victim.pid)
        return result

    def renew_spare_procs(self) -> None:
        """Keeps one ``cgroup.procs`` fd, read once, for :meth:`kill_unseen`."""
        self._spare.renew()

    def _exited(self, victim: Victim) -> bool:
        """Waits up to ``check_timeout`` for a signalled victim to exit;
        True if it did (false at once without a pidfd to wait on)."""
        pidfd = self._table.pidfd(victim.pid)
        if pidfd is None:
            return False
        ready, _, _ = select.select([pidfd], [], [], self._check_timeout)
        return bool(ready)
