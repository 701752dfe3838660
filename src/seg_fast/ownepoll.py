"""A task that puts its process to sleep in its own epoll set when trio has nothing to run.

The gateway's parking lot (proxy/parking.py) and a sizing shard's poller (sim/fleet.py
``Parker``) each watch many sockets through one epoll set of their own. Waiting for that
set through trio (``wait_readable``) costs a pass of trio's scheduler per wake-up: its
epoll_wait, the task rescheduled, its run queue, ~34 of its functions (~135 µs on a cold
core here, benchmarks/wake_footprint.py), and then a second poll of the task's own set.
Instead trio's own epoll descriptor joins the task's set, and when the task is the only
one trio would run it sleeps there itself, bounded by trio's next deadline: a readable
socket of its own wakes it straight into its loop; trio's I/O, a deadline or another task
made runnable hands the loop back to trio at once (a checkpoint).

One task per trio run may sleep this way: a second one (a test running a gateway worker
and a fleet shard in one process) waits through trio as before, and the first one's set,
holding trio's descriptor, wakes for it.
"""
from __future__ import annotations

import select

import trio

# The runs in which a task already sleeps in its own set: id(trio's runner) -> the runner (kept,
# so that a later run given the same id is not taken for it).
_SLEEPING: dict[int, object] = {}


class _Batch(trio.abc.Instrument):
    """Whether the scheduler's batch is the sleeper's alone: after each I/O wait trio wakes the
    tasks whose deadlines passed, then takes its whole run queue and runs those tasks one by
    one. The task may sleep only in a batch of its own; in a bigger one the tasks after it
    would wait for its sleep."""

    def __init__(self, runq, deadlines, now):
        self._runq = runq
        self._deadlines = deadlines
        self._now = now
        self.alone = False

    def after_io_wait(self, timeout) -> None:
        # (called before the deadlines expire: a deadline due now adds a task to the batch)
        self.alone = len(self._runq) == 1 and self._deadlines.next_deadline() > self._now()


class OwnEpoll:
    """``ep``, an epoll set the calling task owns, waited on as the process's sleep where
    trio allows (``here``; else through ``trio.lowlevel.wait_readable``). ``fd`` is trio's
    own descriptor in the set (-1 when not ``here``): an event of it means trio has I/O to
    see to, and the caller then checkpoints (``poll``'s second value says so too when the
    sleep ended on trio's deadline)."""

    def __init__(self, ep: select.epoll, enabled: bool = True) -> None:
        self.ep = ep
        self.fd = -1
        self.here = False
        if not enabled:
            return
        try:
            runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
            self._runq, self._deadlines, self._idle = runner.runq, runner.deadlines, runner.waiting_for_idle
            trio_fd = runner.io_manager._epoll.fileno()
        except AttributeError:        # a trio that keeps these elsewhere: wait through it
            return
        if _SLEEPING.get(id(runner)) is runner:
            return
        self._runner = id(runner)
        self._now = runner.clock.current_time
        self._batch = _Batch(self._runq, self._deadlines, self._now)
        ep.register(trio_fd, select.EPOLLIN)
        trio.lowlevel.add_instrument(self._batch)
        _SLEEPING[self._runner] = runner
        self.fd = trio_fd
        self.here = True

    async def poll(self, most: int = -1) -> tuple[list, bool]:
        """The set's ready events (at most ``most``), and whether trio's deadline ended the
        sleep (then let trio run: a checkpoint)."""
        ep = self.ep
        if not self.here:
            await trio.lowlevel.wait_readable(ep)
            return ep.poll(0, most), False
        if self._runq or not self._batch.alone or self._idle:
            # trio has tasks to run (or may: this batch's others): they run, then the caller
            # looks again. (A cancel of this task can only come from one of them, and a
            # checkpoint delivers it: a batch of its own has nobody to send one.)
            await trio.lowlevel.checkpoint()
            return ep.poll(0, most), False
        timeout = self._deadlines.next_deadline() - self._now()
        events = ep.poll(min(timeout, 60.0) if timeout > 0 else 0, most)
        return events, not events

    def close(self) -> None:
        """No longer sleeping here (the set itself is the caller's to close)."""
        if self.here:
            self.here = False
            trio.lowlevel.remove_instrument(self._batch)
            _SLEEPING.pop(self._runner, None)
            try:
                self.ep.unregister(self.fd)
            except (OSError, ValueError):
                pass
            self.fd = -1
