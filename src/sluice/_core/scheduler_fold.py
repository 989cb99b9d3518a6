"""The scheduler's state and its fold: everything replay needs.

:class:`FoldedState` holds tasks, workers and clients and changes them only in
:meth:`FoldedState.apply`, one event at a time. The decisions that produce
those events live in :mod:`sluice._core.scheduler_state`; keeping the two
apart makes it plain that replay (:meth:`FoldedState.from_events`) runs no
decision code, only the fold the live scheduler runs too.

A task that is forgotten stays in ``tasks`` (in state ``forgotten``) until the
next event is applied, so an inline consumer of the ``-> forgotten``
transition can still read it; :meth:`FoldedState.snapshot` leaves it out.
"""

from __future__ import annotations

import gc
import operator
import sys
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any, NoReturn, Self

import attrs

from sluice._core.transitions import (
    ERRED,
    FORGOTTEN,
    LEGAL_EDGES,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    RELEASED,
    WAITING,
)
from sluice.events import (
    ClientAdded,
    ClientReleasedKeys,
    ClientRemoved,
    Event,
    GraphUpdated,
    Key,
    Restarted,
    TaskTransition,
    WorkerAdded,
    WorkerRemoved,
)

__all__ = (
    "SCHEDULER",
    "ClientRecord",
    "FoldedState",
    "GraphError",
    "SchedulerTask",
    "WorkerRecord",
    "ordered",
)

SCHEDULER = "scheduler"


class GraphError(ValueError):
    """A submitted graph is invalid (unknown dependency, cycle, unknown wanted key)."""


_NONE: frozenset[Any] = frozenset()


class SchedulerTask:
    """The scheduler's view of one task (attribute names follow Dask's ``TaskState``)."""

    __slots__ = (
        "__weakref__",
        "dependencies",
        "dependents",
        "exception",
        "key",
        "nbytes",
        "priority",
        "processing_on",
        "retries",
        "state",
        "traceback",
        "uid",
        "who_has",
        "who_wants",
    )

    def __init__(self, key: Key, uid: int, priority: int = 0, retries: int = 0) -> None:
        self.key = key
        #: Creation order; breaks ties deterministically (set order is hash order).
        self.uid = uid
        self.state = RELEASED
        # Most tasks have no dependencies or no dependents: sharing one empty
        # frozenset until a first element comes saves a set per task (216 bytes),
        # which the garbage collector would otherwise scan again and again in a
        # large graph.
        self.dependencies: AbstractSet[SchedulerTask] = _NONE
        self.dependents: AbstractSet[SchedulerTask] = _NONE
        # Immutable, and shared: a result lives on one worker, a task is wanted
        # by one client, so nearly every task holds its worker's
        # ``WorkerRecord.alone`` and the one frozenset of a graph's client. The
        # fold replaces them (never mutates them) on the rare second element.
        self.who_has: frozenset[WorkerRecord] = _NONE
        self.processing_on: WorkerRecord | None = None
        self.who_wants: frozenset[str] = _NONE
        self.priority = priority
        self.retries = retries
        self.exception: str | None = None
        self.traceback: str | None = None
        self.nbytes: int | None = None

    def __repr__(self) -> str:
        return f"<SchedulerTask {self.key!r} {self.state}>"


class WorkerRecord:
    """The scheduler's view of one worker (Dask's scheduler-side ``WorkerState``)."""

    __slots__ = (
        "__weakref__",
        "address",
        "alone",
        "has_what",
        "memory_limit",
        "name",
        "nthreads",
        "processing",
    )

    def __init__(
        self, address: str, name: str = "", nthreads: int = 1, memory_limit: int = 0
    ) -> None:
        self.address = address
        self.name = name
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.processing: set[SchedulerTask] = set()
        self.has_what: set[SchedulerTask] = set()
        #: ``frozenset({self})``: the ``who_has`` of every result held here alone.
        self.alone: frozenset[WorkerRecord] = frozenset((self,))

    def __repr__(self) -> str:
        return f"<WorkerRecord {self.address!r} processing={len(self.processing)}>"


class ClientRecord:
    """A connected client and the tasks it holds futures for."""

    __slots__ = ("__weakref__", "client_key", "wants_what")

    def __init__(self, client_key: str) -> None:
        self.client_key = client_key
        self.wants_what: set[SchedulerTask] = set()

    def __repr__(self) -> str:
        return f"<ClientRecord {self.client_key!r} wants={len(self.wants_what)}>"


_uid = operator.attrgetter("uid")


def ordered(tasks: Iterable[SchedulerTask]) -> list[SchedulerTask]:
    """``tasks`` in creation order: reproducible, unlike set order."""
    return sorted(tasks, key=_uid)


def _graph_error(tasks: dict[Key, SchedulerTask], ev: GraphUpdated) -> NoReturn:
    """Raise the ValueError that says what is wrong with ``ev`` (known to be invalid)."""
    deps = ev.dependencies
    for key, kdeps in deps.items():
        if key in tasks:
            raise ValueError(f"graph-updated creates {key!r}, which exists")
        for dk in kdeps:
            if dk not in tasks and dk not in deps:
                raise ValueError(f"graph-updated: {key!r} depends on unknown {dk!r}")
    for key in ev.keys:
        if key not in tasks and key not in deps:
            raise ValueError(f"graph-updated: wanted key {key!r} is unknown")
    raise AssertionError("_graph_error called for a valid graph")


class FoldedState:
    """Tasks, workers and clients of one scheduler, changed only by :meth:`apply`.

    The decisions live in the subclass :class:`~sluice._core.scheduler_state.SchedulerState`;
    this half is all that replay needs.
    """

    def __init__(self) -> None:
        self.tasks: dict[Key, SchedulerTask] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        #: Seq of the last applied event (0: none yet).
        self.seq = 0
        #: Ready tasks with no worker to run them, in the order they became so.
        self.unrunnable: dict[SchedulerTask, None] = {}
        self._next_uid = 1
        self._pending_forgotten: list[SchedulerTask] = []
        self._appliers: dict[type[Event], Callable[[Any], None]] = {
            GraphUpdated: self._apply_graph_updated,
            WorkerAdded: self._apply_worker_added,
            WorkerRemoved: self._apply_worker_removed,
            ClientAdded: self._apply_client_added,
            ClientRemoved: self._apply_client_removed,
            ClientReleasedKeys: self._apply_client_released_keys,
            Restarted: self._apply_restarted,
        }
        self._edges: dict[tuple[str, str], Callable[[SchedulerTask, TaskTransition], None]] = {
            (RELEASED, WAITING): self._e_released_waiting,
            (RELEASED, FORGOTTEN): self._e_released_forgotten,
            (WAITING, PROCESSING): self._e_to_processing,
            (WAITING, NO_WORKER): self._e_waiting_no_worker,
            (WAITING, ERRED): self._e_waiting_erred,
            (WAITING, RELEASED): self._e_waiting_released,
            (NO_WORKER, PROCESSING): self._e_to_processing,
            (NO_WORKER, RELEASED): self._e_no_worker_released,
            (PROCESSING, MEMORY): self._e_processing_memory,
            (PROCESSING, ERRED): self._e_processing_erred,
            (PROCESSING, WAITING): self._e_processing_waiting,
            (PROCESSING, RELEASED): self._e_processing_released,
            (MEMORY, RELEASED): self._e_memory_released,
            (ERRED, RELEASED): self._e_erred_released,
        }
        assert frozenset(self._edges) == LEGAL_EDGES

    # ------------------------------------------------------------------ replay

    @classmethod
    def from_events(cls, events: Iterable[Event], until: int | None = None) -> Self:
        """The state after folding ``events`` (up to seq ``until``, inclusive).

        The cyclic garbage collector is paused for the fold: folding a long
        log allocates millions of objects that either live on in the state or
        die by reference counting, so the collector's passes over the growing
        heap find nothing and cost a third of the time.
        """
        state = cls()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            state._fold(events, sys.maxsize if until is None else until)
        finally:
            if was_enabled:
                gc.enable()
        return state

    def _fold(self, events: Iterable[Event], until: int) -> None:
        """``apply`` each event up to seq ``until``, with :meth:`apply`'s checks.

        Nearly every event of a log is a task transition that follows its
        predecessor; this loop applies those itself, with everything it needs
        in locals, and hands any other event (and any transition that would
        fail a check, so the error is :meth:`apply`'s) to :meth:`apply`.
        """
        apply = self.apply
        tasks = self.tasks
        edges = self._edges
        pending = self._pending_forgotten
        transition = TaskTransition
        last = self.seq
        for event in events:
            seq = event.seq
            if seq > until:
                break
            if seq == last + 1 and type(event) is transition and not pending:
                if event.source == SCHEDULER:  # a worker's transition changes nothing here
                    ts = tasks.get(event.key)
                    start = event.start
                    edge = edges.get((start, event.finish))
                    if ts is None or ts.state != start or edge is None:
                        apply(event)  # raises the precise error
                    else:
                        edge(ts, event)
                self.seq = last = seq
            else:
                apply(event)
                last = self.seq

    def record(self, event: Event, *, now: float) -> Event:
        """Stamp an event that comes from outside the decisions, apply it, return it.

        Worker transitions, user events and plugin changes take their place in
        the scheduler's one gap-free sequence this way.
        """
        if event.time == 0:
            event = attrs.evolve(event, seq=self.seq + 1, time=now)
        else:
            event = attrs.evolve(event, seq=self.seq + 1)
        self.apply(event)
        return event

    # ------------------------------------------------------------------- apply

    def apply(self, event: Event) -> None:
        """Change the state as ``event`` says; the only mutator.

        Raises ValueError on a seq gap or duplicate and on a scheduler
        transition that does not start from the task's current state or is
        not in the diagram, leaving the state as it was.
        """
        seq = event.seq
        if seq != self.seq + 1:
            raise ValueError(f"event seq {seq} does not follow {self.seq}")
        if self._pending_forgotten:
            self._purge_forgotten()
        if type(event) is TaskTransition:
            # Inlined: transitions are nearly every event, and replay speed matters.
            if event.source == SCHEDULER:
                ts = self.tasks.get(event.key)
                if ts is None:
                    raise ValueError(f"transition of unknown task {event.key!r}")
                start = event.start
                if ts.state != start:
                    raise ValueError(
                        f"transition {start} -> {event.finish} of {event.key!r}, "
                        f"which is {ts.state}"
                    )
                edge = self._edges.get((start, event.finish))
                if edge is None:
                    raise ValueError(
                        f"illegal transition {start} -> {event.finish} of {event.key!r}"
                    )
                edge(ts, event)
        else:
            applier = self._appliers.get(type(event))
            if applier is not None:
                applier(event)
        self.seq = seq

    def _purge_forgotten(self) -> None:
        tasks = self.tasks
        for ts in self._pending_forgotten:
            if tasks.get(ts.key) is ts:
                del tasks[ts.key]
        self._pending_forgotten.clear()

    def _e_released_waiting(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ts.state = WAITING

    def _e_released_forgotten(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        if ts.dependents or ts.who_wants:
            raise ValueError(f"cannot forget {ts.key!r}: it is still referred to")
        ts.state = FORGOTTEN
        for dep in ts.dependencies:
            dependents = dep.dependents
            assert isinstance(dependents, set)
            dependents.discard(ts)
        self._pending_forgotten.append(ts)

    def _e_to_processing(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ws = self.workers.get(ev.worker)  # type: ignore[arg-type]
        if ws is None:
            raise ValueError(f"{ev.key!r} sent to unknown worker {ev.worker!r}")
        if ts.state == NO_WORKER:
            del self.unrunnable[ts]
        ts.state = PROCESSING
        ts.processing_on = ws
        ws.processing.add(ts)

    def _e_waiting_no_worker(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ts.state = NO_WORKER
        self.unrunnable[ts] = None

    def _e_waiting_erred(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ts.state = ERRED
        ts.exception = ev.exception
        ts.traceback = ev.traceback

    def _e_waiting_released(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ts.state = RELEASED

    def _e_no_worker_released(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        del self.unrunnable[ts]
        ts.state = RELEASED

    def _stop_processing(self, ts: SchedulerTask) -> None:
        ws = ts.processing_on
        if ws is not None:
            ws.processing.discard(ts)
        ts.processing_on = None

    def _e_processing_memory(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ws = ts.processing_on
        if ws is None or ws.address != ev.worker:
            raise ValueError(f"{ev.key!r} finished on {ev.worker!r}, not where it was processing")
        ws.processing.discard(ts)
        ts.processing_on = None
        ts.state = MEMORY
        ts.who_has = ws.alone if not ts.who_has else ts.who_has | ws.alone
        ws.has_what.add(ts)
        ts.nbytes = ev.nbytes
        ts.exception = ts.traceback = None

    def _e_processing_erred(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        self._stop_processing(ts)
        ts.state = ERRED
        ts.exception = ev.exception
        ts.traceback = ev.traceback

    def _e_processing_waiting(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        self._stop_processing(ts)
        ts.state = WAITING
        ts.retries -= 1
        ts.exception = ev.exception
        ts.traceback = ev.traceback

    def _e_processing_released(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        self._stop_processing(ts)
        ts.state = RELEASED

    def _e_memory_released(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        for ws in ts.who_has:
            ws.has_what.discard(ts)
        ts.who_has = _NONE
        ts.state = RELEASED

    def _e_erred_released(self, ts: SchedulerTask, ev: TaskTransition) -> None:
        ts.state = RELEASED
        ts.exception = ts.traceback = None

    def _apply_graph_updated(self, ev: GraphUpdated) -> None:
        # A graph can hold hundreds of thousands of tasks. Every loop here walks
        # the keys in submission order, which is also the order of the tasks in
        # memory: set operations, which visit them in hash order, miss the CPU
        # caches on each key and cost several times more.
        tasks = self.tasks
        deps = ev.dependencies
        if not (
            tasks.keys().isdisjoint(deps)
            and all(dk in tasks or dk in deps for kdeps in deps.values() for dk in kdeps)
        ):
            _graph_error(tasks, ev)
        priority = ev.priority
        retries = ev.retries
        uid = self._next_uid
        new = SchedulerTask
        if priority or retries:
            created = {
                key: new(key, i, priority.get(key, 0), retries.get(key, 0))
                for i, key in enumerate(deps, uid)
            }
        else:
            created = {key: new(key, i) for i, key in enumerate(deps, uid)}
        try:
            wanted = [created.get(key) or tasks[key] for key in ev.keys]
        except KeyError:
            _graph_error(tasks, ev)
        # Valid: from here on the state changes.
        tasks.update(created)
        self._next_uid = uid + len(created)
        for key, kdeps in deps.items():
            if kdeps:
                ts = created[key]
                dependencies = set()
                for dk in kdeps:
                    dts = tasks[dk]
                    dependencies.add(dts)
                    dependents = dts.dependents
                    if dependents is _NONE:
                        dts.dependents = {ts}
                    else:
                        dependents.add(ts)  # type: ignore[attr-defined]
                ts.dependencies = dependencies
        name = ev.client
        only = frozenset((name,))  # shared by the tasks no one else wants
        for ts in wanted:
            who_wants = ts.who_wants
            ts.who_wants = only if not who_wants else who_wants | only
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = ClientRecord(name)
        client.wants_what.update(wanted)

    def _apply_worker_added(self, ev: WorkerAdded) -> None:
        if ev.worker in self.workers:
            raise ValueError(f"worker {ev.worker!r} is already known")
        self.workers[ev.worker] = WorkerRecord(ev.worker, ev.name, ev.nthreads, ev.memory_limit)

    def _apply_worker_removed(self, ev: WorkerRemoved) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            raise ValueError(f"unknown worker {ev.worker!r} removed")
        if ws.processing:
            raise ValueError(f"worker {ev.worker!r} removed while still processing tasks")
        for ts in ws.has_what:
            if len(ts.who_has) == 1:
                raise ValueError(
                    f"worker {ev.worker!r} removed with the only replica of {ts.key!r}"
                )
        for ts in ws.has_what:
            ts.who_has = ts.who_has - ws.alone
        ws.has_what.clear()
        del self.workers[ev.worker]

    def _apply_client_added(self, ev: ClientAdded) -> None:
        if ev.client not in self.clients:
            self.clients[ev.client] = ClientRecord(ev.client)

    def _apply_client_removed(self, ev: ClientRemoved) -> None:
        client = self.clients.pop(ev.client, None)
        if client is None:
            return
        for ts in client.wants_what:
            ts.who_wants = ts.who_wants - {ev.client} or _NONE

    def _apply_client_released_keys(self, ev: ClientReleasedKeys) -> None:
        client = self.clients.get(ev.client)
        if client is None:
            return
        tasks = self.tasks
        for key in ev.keys:
            ts = tasks.get(key)
            if ts is not None:
                if ev.client in ts.who_wants:
                    ts.who_wants = ts.who_wants - {ev.client} or _NONE
                client.wants_what.discard(ts)

    def _apply_restarted(self, ev: Restarted) -> None:
        self.tasks.clear()
        self.unrunnable.clear()
        self._pending_forgotten.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.has_what.clear()
        for client in self.clients.values():
            client.wants_what.clear()

    # ---------------------------------------------------------------- snapshot

    def snapshot(self) -> dict[str, Any]:
        """A plain, comparable description of the whole state.

        Tasks forgotten by the last event (still readable in ``tasks``) are
        left out: they are gone as far as any later decision is concerned.
        """
        tasks: dict[Key, dict[str, Any]] = {}
        for key, ts in self.tasks.items():
            if ts.state == FORGOTTEN:
                continue
            tasks[key] = {
                "uid": ts.uid,
                "state": ts.state,
                "dependencies": frozenset(d.key for d in ts.dependencies),
                "dependents": frozenset(d.key for d in ts.dependents),
                "who_has": frozenset(w.address for w in ts.who_has),
                "processing_on": None if ts.processing_on is None else ts.processing_on.address,
                "who_wants": frozenset(ts.who_wants),
                "priority": ts.priority,
                "retries": ts.retries,
                "exception": ts.exception,
                "traceback": ts.traceback,
                "nbytes": ts.nbytes,
            }
        workers = {
            address: {
                "name": ws.name,
                "nthreads": ws.nthreads,
                "memory_limit": ws.memory_limit,
                "processing": frozenset(t.key for t in ws.processing),
                "has_what": frozenset(t.key for t in ws.has_what),
            }
            for address, ws in self.workers.items()
        }
        clients = {
            name: frozenset(t.key for t in cs.wants_what) for name, cs in self.clients.items()
        }
        return {
            "seq": self.seq,
            "tasks": tasks,
            "workers": workers,
            "clients": clients,
            "unrunnable": tuple(t.key for t in self.unrunnable),
            "next_uid": self._next_uid,
        }
