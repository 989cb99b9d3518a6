"""One worker's pure state machine.

Theory of operation
-------------------
:meth:`WorkerState.handle` takes one command (a scheduler message, a task
that returned or raised, a peer's answer to a data request), decides what
follows and expresses every decision as an event, stamped with the next
``seq``. :meth:`WorkerState.apply` is the only code that changes state, and
each event is applied the moment it is emitted, so a later decision of the
same ``handle`` sees the earlier ones. Replaying a log
(:meth:`WorkerState.from_events`) rebuilds exactly the live state. Nothing
here reads a clock, a random source, a thread or the network.

A :class:`~sluice.events.TaskTransition` does not carry what a compute
request brings (priority, dependencies and where they live) nor the fact that
the scheduler gave a key up, so two worker-local events record them:
:class:`ComputeRequested` and :class:`FreeRequested`.

Rules the decisions keep (checked by the tests after every step):

- A task is *needed* while the scheduler wants it here (``requested``) or a
  dependent on this worker still has to run (waiting, ready, executing,
  long-running). A task that stops being needed is released and forgotten at
  once; forgetting walks down to its dependencies. No task rests in
  ``released``: it is a way station to ``waiting``, ``fetch`` or ``forgotten``.
- A dependency fetched from a peer is dropped as soon as no dependent here
  needs it: the scheduler does not know about such copies.
- At most ``nthreads`` tasks execute; ready tasks start by priority (lower
  first), then by the order they were requested. An executing task's
  dependencies are all in memory.
- Each peer serves one data request at a time, and at most
  :data:`MAX_PEERS_IN_FLIGHT` peers are asked at once.
- A dependency that no peer can give any more is reported with
  :class:`~sluice._core.messages.MissingDataMsg`; the tasks here that waited
  on it are dropped (``waiting -> released -> forgotten``) and the scheduler
  sends the work again.
- Cancelling a running task (``executing -> released -> forgotten``) frees its
  slot at once; its thread runs on in the server's pool, whose size is the
  real bound. When its result comes it finds the task no longer executing
  and is discarded. That "the state remembers" is the state itself.

On a worker, a transition's ``worker`` field names the *peer* involved: the
one a dependency is fetched from (``fetch -> flight``, ``flight -> memory``)
or the one that failed to give it (``flight -> fetch``, ``flight -> released``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any, Final

from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    MissingDataMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice._core.worker_commands import (
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    Instruction,
    ReleaseData,
    SecedeTask,
    WorkerCommand,
)
from sluice.events import ComputeRequested, Event, FreeRequested, Key, TaskTransition

__all__ = (
    "MAX_PEERS_IN_FLIGHT",
    "WORKER_LEGAL_EDGES",
    "WORKER_STATES",
    "WorkerState",
    "WorkerTask",
)

RELEASED: Final = "released"
WAITING: Final = "waiting"
READY: Final = "ready"
EXECUTING: Final = "executing"
LONG_RUNNING: Final = "long-running"
FETCH: Final = "fetch"
FLIGHT: Final = "flight"
MEMORY: Final = "memory"
ERROR: Final = "error"
FORGOTTEN: Final = "forgotten"

WORKER_STATES: Final[tuple[str, ...]] = (
    RELEASED,
    WAITING,
    READY,
    EXECUTING,
    LONG_RUNNING,
    FETCH,
    FLIGHT,
    MEMORY,
    ERROR,
    FORGOTTEN,
)

#: Exactly the ``(start, finish)`` pairs a worker emits; ``apply`` rejects others.
WORKER_LEGAL_EDGES: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        (RELEASED, WAITING),  # asked to compute it
        (RELEASED, FETCH),  # a task here needs it and peers hold it
        (RELEASED, FORGOTTEN),  # nothing needs it any more
        (WAITING, READY),  # every dependency in memory
        (WAITING, RELEASED),  # freed, or a dependency was lost
        (READY, EXECUTING),  # a thread is free and it is next by priority
        (READY, RELEASED),  # freed before it started
        (EXECUTING, MEMORY),  # its function returned
        (EXECUTING, ERROR),  # its function raised
        (EXECUTING, LONG_RUNNING),  # it seceded from its thread
        (EXECUTING, RELEASED),  # cancelled; a late result is discarded
        (LONG_RUNNING, MEMORY),
        (LONG_RUNNING, ERROR),
        (LONG_RUNNING, RELEASED),
        (FETCH, FLIGHT),  # asked a peer for it
        (FETCH, RELEASED),  # no longer needed
        (FLIGHT, MEMORY),  # the peer sent it
        (FLIGHT, FETCH),  # the peer failed; others hold it
        (FLIGHT, RELEASED),  # the peer failed and nobody else holds it, or cancelled
        (MEMORY, RELEASED),  # freed: its value is dropped
        (ERROR, RELEASED),  # freed, retried, or now fetched from a peer
    }
)

#: A dependent in one of these states still needs its dependencies here.
_RUNNABLE: Final[frozenset[str]] = frozenset({WAITING, READY, EXECUTING, LONG_RUNNING})

#: At most this many peers serve a data request at once.
MAX_PEERS_IN_FLIGHT: Final = 4


# -- tasks --------------------------------------------------------------------


class WorkerTask:
    """The worker's view of one task (the scheduler's is ``SchedulerTask``)."""

    __slots__ = (
        "coming_from",
        "dependencies",
        "dependents",
        "duration",
        "exception",
        "key",
        "missing_from",
        "nbytes",
        "order",
        "priority",
        "requested",
        "state",
        "traceback",
        "uid",
        "who_has",
    )

    def __init__(self, key: Key, uid: int) -> None:
        self.key: Key = key
        #: Creation order; the hash, so iterating a set of tasks is reproducible
        #: (hash-by-id order would change between runs).
        self.uid = uid
        self.state: str = RELEASED
        self.dependencies: set[WorkerTask] = set()
        self.dependents: set[WorkerTask] = set()
        #: Peers that hold this key (never this worker itself).
        self.who_has: set[str] = set()
        #: Peers that failed to give it; reported in MissingDataMsg.
        self.missing_from: set[str] = set()
        #: The peer it is being fetched from, while in flight.
        self.coming_from: str | None = None
        self.priority: int = 0
        #: Position of its last compute request; breaks priority ties.
        self.order: int = 0
        #: The scheduler wants it on this worker (asked to compute, not freed).
        self.requested: bool = False
        self.nbytes: int | None = None
        self.duration: float | None = None
        self.exception: str | None = None
        self.traceback: str | None = None

    def __hash__(self) -> int:
        return self.uid

    def __repr__(self) -> str:
        return f"<WorkerTask {self.key!r} {self.state}>"

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "uid": self.uid,
            "dependencies": frozenset(d.key for d in self.dependencies),
            "dependents": frozenset(d.key for d in self.dependents),
            "who_has": frozenset(self.who_has),
            "missing_from": frozenset(self.missing_from),
            "coming_from": self.coming_from,
            "priority": self.priority,
            "order": self.order,
            "requested": self.requested,
            "nbytes": self.nbytes,
            "duration": self.duration,
            "exception": self.exception,
            "traceback": self.traceback,
        }


# -- the state machine -------------------------------------------------------

Emit = Callable[[Event], object]


class WorkerState:
    """Tasks of one worker, changed only by :meth:`apply`."""

    def __init__(self, address: str, nthreads: int) -> None:
        self.address = address
        self.nthreads = nthreads
        self.seq = 0
        self.tasks: dict[Key, WorkerTask] = {}
        #: Keys running on a thread (long-running ones are not counted).
        self.executing: set[Key] = set()
        self.long_running: set[Key] = set()
        #: Heap of (priority, order, key). Entries of tasks that moved on are
        #: stale and dropped lazily, but the head is always a ready task.
        self.ready: list[tuple[int, int, Key]] = []
        #: Tasks waiting for a free peer, in the order they were needed.
        self.fetching: dict[Key, WorkerTask] = {}
        #: Peer -> keys being fetched from it.
        self.in_flight_workers: dict[str, set[Key]] = {}
        self._requests = 0
        self._uids = 0

        # Context of the handle() call in progress.
        self._now = 0.0
        self._stim = ""
        self._emit: Emit | None = None
        self._events: list[Event] = []
        self._out: list[Instruction] = []
        self._dropped: list[Key] = []

        self._handlers: dict[type, Callable[[Any], None]] = {
            ComputeTaskMsg: self._h_compute,
            FreeKeysMsg: self._h_free,
            ExecuteSuccess: self._h_execute_success,
            ExecuteFailure: self._h_execute_failure,
            GatherDepSuccess: self._h_gather_success,
            GatherDepFailure: self._h_gather_failure,
            SecedeTask: self._h_secede,
        }

    # -- replay ---------------------------------------------------------------

    @classmethod
    def from_events(cls, address: str, nthreads: int, events: Iterable[Event]) -> WorkerState:
        """The state that this worker's log describes."""
        state = cls(address, nthreads)
        for event in events:
            state.apply(event)
        return state

    def snapshot(self) -> dict[str, Any]:
        """Everything that defines this state, as plain comparable values."""
        tasks = self.tasks
        ready = []
        seen: set[Key] = set()
        for priority, order, key in sorted(self.ready, key=lambda e: (e[0], e[1])):
            ts = tasks.get(key)
            if (
                ts is not None
                and ts.state == READY
                and ts.priority == priority
                and ts.order == order
                and key not in seen
            ):
                seen.add(key)
                ready.append(key)
        return {
            "address": self.address,
            "nthreads": self.nthreads,
            "seq": self.seq,
            "requests": self._requests,
            "tasks": {key: ts.snapshot() for key, ts in tasks.items()},
            "executing": frozenset(self.executing),
            "long_running": frozenset(self.long_running),
            "ready": ready,
            "fetching": list(self.fetching),
            "in_flight_workers": {w: frozenset(ks) for w, ks in self.in_flight_workers.items()},
        }

    # -- the only mutator -------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Apply one event of this worker's log.

        Raises ValueError on a gap or duplicate in ``seq``, an event of another
        source, an illegal edge, or a start that is not the task's state.
        Events of other kinds only advance ``seq``, so a log mixing in (say)
        user events still replays.
        """
        if event.seq != self.seq + 1:
            raise ValueError(f"event seq {event.seq} does not follow {self.seq}")
        cls = type(event)
        if cls is TaskTransition:
            self._check_source(event)
            self._apply_transition(event)  # type: ignore[arg-type]
        elif cls is ComputeRequested:
            self._check_source(event)
            self._apply_compute_requested(event)  # type: ignore[arg-type]
        elif cls is FreeRequested:
            self._check_source(event)
            for key in event.keys:  # type: ignore[attr-defined]
                ts = self.tasks.get(key)
                if ts is not None:
                    ts.requested = False
        self.seq = event.seq

    def _check_source(self, event: Event) -> None:
        if event.source != self.address:
            raise ValueError(f"event from {event.source!r} applied to worker {self.address!r}")

    def _apply_compute_requested(self, ev: ComputeRequested) -> None:
        tasks = self.tasks
        ts = tasks.get(ev.key)
        if ts is None:
            self._uids += 1
            ts = tasks[ev.key] = WorkerTask(ev.key, self._uids)
        self._requests += 1
        ts.requested = True
        ts.priority = ev.priority
        ts.order = self._requests
        if ts.state == READY:
            heapq.heappush(self.ready, (ts.priority, ts.order, ts.key))
            self._clean_ready()
        if ts.state != RELEASED and ts.state != ERROR:
            return  # already computing, fetched or computed: dependencies are moot
        me = self.address
        for dep, peers in ev.who_has.items():
            if dep == ev.key:
                continue
            dts = tasks.get(dep)
            if dts is None:
                self._uids += 1
                dts = tasks[dep] = WorkerTask(dep, self._uids)
            dts.who_has.update(p for p in peers if p != me)
            ts.dependencies.add(dts)
            dts.dependents.add(ts)

    def _clean_ready(self) -> None:
        """Pop stale entries off the heap, so its head is always the next to run."""
        ready = self.ready
        tasks = self.tasks
        while ready:
            _, order, key = ready[0]
            ts = tasks.get(key)
            if ts is not None and ts.state == READY and ts.order == order:
                return
            heapq.heappop(ready)

    def _apply_transition(self, ev: TaskTransition) -> None:
        key = ev.key
        ts = self.tasks.get(key)
        if ts is None:
            raise ValueError(f"transition of unknown task {key!r}")
        start = ev.start
        finish = ev.finish
        if ts.state != start:
            raise ValueError(f"transition {start} -> {finish} of {key!r}, which is {ts.state}")
        if (start, finish) not in WORKER_LEGAL_EDGES:
            raise ValueError(f"illegal worker transition {start} -> {finish} of {key!r}")

        # Leave the start state.
        if start == EXECUTING:
            self.executing.discard(key)
        elif start == LONG_RUNNING:
            self.long_running.discard(key)
        elif start == FETCH:
            del self.fetching[key]
        elif start == FLIGHT:
            peer = ts.coming_from
            assert peer is not None
            keys = self.in_flight_workers[peer]
            keys.discard(key)
            if not keys:
                del self.in_flight_workers[peer]
            ts.coming_from = None
            if finish != MEMORY and ev.worker is not None:
                ts.who_has.discard(ev.worker)
                ts.missing_from.add(ev.worker)

        ts.state = finish
        if start == READY:
            self._clean_ready()

        # Enter the finish state.
        if finish == READY:
            heapq.heappush(self.ready, (ts.priority, ts.order, key))
        elif finish == EXECUTING:
            if len(self.executing) >= self.nthreads:
                raise ValueError(f"{key!r} executing with all {self.nthreads} threads busy")
            self.executing.add(key)
        elif finish == MEMORY:
            ts.nbytes = ev.nbytes
            ts.duration = ev.duration
        elif finish == ERROR:
            ts.exception = ev.exception
            ts.traceback = ev.traceback
            ts.duration = ev.duration
        elif finish == LONG_RUNNING:
            self.long_running.add(key)
        elif finish == FETCH:
            self.fetching[key] = ts
        elif finish == FLIGHT:
            peer = ev.worker
            if peer is None:
                raise ValueError(f"{key!r} in flight from no peer")
            ts.coming_from = peer
            self.in_flight_workers.setdefault(peer, set()).add(key)
        elif finish == RELEASED:
            ts.nbytes = ts.duration = ts.exception = ts.traceback = None
        elif finish == FORGOTTEN:
            del self.tasks[key]
            for dts in ts.dependencies:
                dts.dependents.discard(ts)
            for dts in ts.dependents:
                dts.dependencies.discard(ts)

    # -- the entry point ------------------------------------------------------------

    def handle(
        self, cmd: WorkerCommand, *, now: float, emit: Emit | None = None
    ) -> tuple[list[Event], list[Instruction]]:
        """Decide what ``cmd`` leads to; return the applied events and instructions.

        ``emit`` sees each event right after it is applied (the server runs the
        inline ``WorkerPlugin.transition`` hooks there).
        """
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise TypeError(f"not a worker command: {cmd!r}")
        self._now = now
        self._stim = cmd.stimulus_id
        self._emit = emit
        events: list[Event] = []
        out: list[Instruction] = []
        self._events = events
        self._out = out
        self._dropped = []
        try:
            handler(cmd)
            if self.fetching and len(self.in_flight_workers) < MAX_PEERS_IN_FLIGHT:
                self._ensure_communicating()
            if self.ready and len(self.executing) < self.nthreads:
                self._ensure_computing()
            if self._dropped:
                out.append(ReleaseData(keys=tuple(self._dropped), stimulus_id=self._stim))
        finally:
            self._emit = None
            self._events = []
            self._out = []
        return events, out

    # -- emitting -------------------------------------------------------------------

    def _record(self, event: Event) -> None:
        self.apply(event)
        self._events.append(event)
        if self._emit is not None:
            self._emit(event)

    def _go(self, ts: WorkerTask, finish: str, **extra: Any) -> None:
        """Emit and apply ``ts``'s transition to ``finish`` (the hot path).

        ``extra`` are the optional TaskTransition fields; leaving them out
        when unset is measurably faster. The event is built here with the
        right seq and source, so only the transition itself is checked.
        """
        if finish == RELEASED and ts.state == MEMORY:
            self._dropped.append(ts.key)
        seq = self.seq + 1
        ev = TaskTransition(
            seq=seq,
            time=self._now,
            source=self.address,
            key=ts.key,
            start=ts.state,
            finish=finish,
            stimulus_id=self._stim,
            **extra,
        )
        self._apply_transition(ev)
        self.seq = seq
        self._events.append(ev)
        if self._emit is not None:
            self._emit(ev)

    # -- handlers ---------------------------------------------------------------------

    def _h_compute(self, msg: ComputeTaskMsg) -> None:
        ts = self.tasks.get(msg.key)
        if ts is not None and ts.requested:
            if ts.state == MEMORY:
                self._out.append(self._finished(ts))  # asked again: say so again
                return
            if ts.state != ERROR:
                return  # a duplicate: it is already on its way
            # Asked again after a failure: a retry, with fresh dependencies.
        self._record(
            ComputeRequested(
                seq=self.seq + 1,
                time=self._now,
                source=self.address,
                key=msg.key,
                priority=msg.priority,
                who_has=msg.who_has,
                stimulus_id=msg.stimulus_id,
            )
        )
        ts = self.tasks[msg.key]
        state = ts.state
        if state == MEMORY:
            self._out.append(self._finished(ts))
        elif state == ERROR:
            self._go(ts, RELEASED)
            self._compute(ts)
        elif state == RELEASED:
            self._compute(ts)
        # Otherwise it was kept here for a dependent and is on its way (being
        # computed or fetched); now requested, it will be reported when done.

    def _compute(self, ts: WorkerTask) -> None:
        self._go(ts, WAITING)
        missing = False
        lost: list[WorkerTask] = []
        for dts in ts.dependencies:
            state = dts.state
            if state == MEMORY:
                continue
            missing = True
            if state == ERROR:
                self._go(dts, RELEASED)
                state = RELEASED
            if state == RELEASED:
                if dts.who_has:
                    self._go(dts, FETCH)
                else:
                    lost.append(dts)
        if lost:
            self._lose(lost)
        if not missing and ts.state == WAITING:
            self._go(ts, READY)

    def _h_free(self, msg: FreeKeysMsg) -> None:
        tasks = self.tasks
        known = [tasks[k] for k in msg.keys if k in tasks]
        if not known:
            return
        self._record(
            FreeRequested(
                seq=self.seq + 1,
                time=self._now,
                source=self.address,
                keys=tuple(ts.key for ts in known),
                stimulus_id=msg.stimulus_id,
            )
        )
        for ts in known:
            self._forget_if_unneeded(ts)

    def _h_execute_success(self, cmd: ExecuteSuccess) -> None:
        ts = self.tasks.get(cmd.key)
        if ts is None or (ts.state != EXECUTING and ts.state != LONG_RUNNING):
            return  # cancelled meanwhile, or a duplicate: discard
        self._go(ts, MEMORY, nbytes=cmd.nbytes, duration=cmd.duration)
        if ts.requested:
            self._out.append(self._finished(ts))
        self._after_run(ts)
        self._after_arrival(ts)

    def _h_execute_failure(self, cmd: ExecuteFailure) -> None:
        ts = self.tasks.get(cmd.key)
        if ts is None or (ts.state != EXECUTING and ts.state != LONG_RUNNING):
            return
        self._go(ts, ERROR, duration=cmd.duration, exception=cmd.exception, traceback=cmd.traceback)
        if ts.requested:
            self._out.append(
                TaskErredMsg(
                    worker=self.address,
                    key=ts.key,
                    exception=cmd.exception,
                    traceback=cmd.traceback,
                    duration=cmd.duration,
                    stimulus_id=self._stim,
                )
            )
        self._after_run(ts)

    def _h_gather_success(self, cmd: GatherDepSuccess) -> None:
        peer = cmd.worker
        in_flight = self.in_flight_workers.get(peer)
        if not in_flight:
            return
        tasks = self.tasks
        arrived = []
        for key, nbytes in cmd.nbytes.items():
            ts = tasks.get(key)
            if ts is not None and ts.state == FLIGHT and ts.coming_from == peer:
                self._go(ts, MEMORY, worker=peer, nbytes=nbytes)
                arrived.append(ts)
        for ts in arrived:
            if ts.requested:
                self._out.append(self._finished(ts))
            self._after_arrival(ts)

    def _h_gather_failure(self, cmd: GatherDepFailure) -> None:
        peer = cmd.worker
        if not self.in_flight_workers.get(peer):
            return
        tasks = self.tasks
        for key in cmd.keys:
            ts = tasks.get(key)
            if ts is None or ts.state != FLIGHT or ts.coming_from != peer:
                continue
            if ts.who_has - {peer}:
                self._go(ts, FETCH, worker=peer)
            else:
                self._go(ts, RELEASED, worker=peer)
                self._lose([ts])

    def _h_secede(self, cmd: SecedeTask) -> None:
        ts = self.tasks.get(cmd.key)
        if ts is not None and ts.state == EXECUTING:
            self._go(ts, LONG_RUNNING)

    # -- decisions shared by the handlers ---------------------------------------------

    def _finished(self, ts: WorkerTask) -> TaskFinishedMsg:
        return TaskFinishedMsg(
            worker=self.address,
            key=ts.key,
            nbytes=ts.nbytes or 0,
            duration=ts.duration or 0.0,
            stimulus_id=self._stim,
        )

    def _after_run(self, ts: WorkerTask) -> None:
        """``ts`` stopped running: its dependencies may no longer be needed."""
        if ts.dependencies:
            for dts in list(ts.dependencies):
                self._forget_if_unneeded(dts)

    def _after_arrival(self, ts: WorkerTask) -> None:
        """``ts`` is in memory: dependents that waited only for it are ready."""
        for dep in ts.dependents:
            if dep.state == WAITING and all(d.state == MEMORY for d in dep.dependencies):
                self._go(dep, READY)

    @staticmethod
    def _needed(ts: WorkerTask) -> bool:
        if ts.requested:
            return True
        return any(d.state in _RUNNABLE for d in ts.dependents)

    def _forget_if_unneeded(self, ts: WorkerTask) -> None:
        """Release and forget ``ts`` if nothing needs it, then its dependencies."""
        stack = [ts]
        tasks = self.tasks
        while stack:
            ts = stack.pop()
            if tasks.get(ts.key) is not ts or self._needed(ts):
                continue
            if ts.state != RELEASED:
                self._go(ts, RELEASED)
            deps = list(ts.dependencies)
            self._go(ts, FORGOTTEN)
            stack.extend(deps)

    def _lose(self, lost: list[WorkerTask]) -> None:
        """No peer can give these (released) tasks: tell the scheduler, drop their waiters."""
        for dts in lost:
            self._out.append(
                MissingDataMsg(
                    worker=self.address,
                    key=dts.key,
                    errant_workers=tuple(sorted(dts.missing_from)),
                    stimulus_id=self._stim,
                )
            )
        # Everything here that waits on them, directly or through another
        # waiting task, cannot run: drop it, the scheduler sends the work again.
        chain: list[WorkerTask] = []
        seen = set(lost)
        stack = list(lost)
        while stack:
            t = stack.pop()
            for d in t.dependents:
                if d.state == WAITING and d not in seen:
                    seen.add(d)
                    chain.append(d)
                    stack.append(d)
        for t in chain:
            self._go(t, RELEASED)
        tasks = self.tasks
        for t in [*chain, *lost]:
            if tasks.get(t.key) is not t:
                continue
            deps = list(t.dependencies)
            self._go(t, FORGOTTEN)
            for d in deps:
                self._forget_if_unneeded(d)

    def _ensure_communicating(self) -> None:
        """Ask free peers for the dependencies waiting to be fetched, one request each."""
        in_flight = self.in_flight_workers
        batches: dict[str, list[WorkerTask]] = {}
        for ts in list(self.fetching.values()):
            peers = [p for p in ts.who_has if p not in in_flight]
            if not peers:
                continue
            chosen = [p for p in peers if p in batches]
            if chosen:
                batches[min(chosen)].append(ts)
            elif len(in_flight) + len(batches) < MAX_PEERS_IN_FLIGHT:
                batches[min(peers)] = [ts]
        for peer, batch in batches.items():
            for ts in batch:
                self._go(ts, FLIGHT, worker=peer)
            self._out.append(
                GatherDep(worker=peer, keys=tuple(ts.key for ts in batch), stimulus_id=self._stim)
            )

    def _ensure_computing(self) -> None:
        """Start ready tasks, best priority first, while threads are free."""
        ready = self.ready
        tasks = self.tasks
        while ready and len(self.executing) < self.nthreads:
            key = ready[0][2]  # never stale: apply keeps the head valid
            self._go(tasks[key], EXECUTING)
            self._out.append(Execute(key=key, stimulus_id=self._stim))
