"""The scheduler's pure state machine: commands in, events and messages out.

Theory of operation
-------------------
:meth:`SchedulerState.handle` takes one command (a client's graph, a worker
joining, a worker's report, ...), decides what follows (which tasks become
ready, which worker runs them, which results are no longer needed) and
expresses every decision as an event. ``apply`` (in
:class:`~sluice._core.scheduler_fold.FoldedState`) is the only code that
changes state, and each event is applied the moment it is emitted, so a later
decision in the same ``handle`` sees the earlier ones. Replaying a log through
``apply`` therefore rebuilds exactly the live state; nothing here reads a
clock, a random source or the network.

Rules the decisions keep (the tests check them after every step):

- A task that still has to run (waiting, no-worker, processing) is *needed*:
  a client wants it or an active dependent does. A task that stops being
  needed is released at once; a released task that nothing refers to any
  more (no client, no dependent left) is forgotten. Forgetting walks down to
  the dependencies, which may become forgettable in turn.
- A processing task's dependencies are all in memory. If one is lost (its
  worker died, a peer could not find it) the task goes back to waiting.
- A no-worker task is ready; there are such tasks only while there is no worker.
- A ready task without dependencies (a root) is sent to a worker only while that
  worker runs fewer than ``worker_saturation`` tasks per thread; otherwise it
  stays waiting in the scheduler's queue, in (priority, creation) order, and
  goes to the first worker with room. So a graph of a million roots costs the
  scheduler its tasks, not a million dispatch messages at once, and a worker
  that joins late gets its share. A task with dependencies goes out as soon as
  they are done: the roots already bound how many of those there are.
- Each result lives on exactly the worker that computed it (``who_has`` has
  one entry): peers that fetch a copy do not report it.
- An erred task stays erred while a client or a dependent refers to it, so
  its dependents can name it as the cause of their failure.
- Ties are broken by task creation order (``SchedulerTask.uid``) or worker
  address, never by hash order, so a run is reproducible.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any, Self

from sluice._core.commands import (
    AddClient,
    AddWorker,
    Command,
    ReleaseKeys,
    RemoveClient,
    RemoveWorker,
    Restart,
    UpdateGraph,
)
from sluice._core.graph_check import check_graph
from sluice._core.messages import (
    ComputeTaskMsg,
    FreeKeysMsg,
    KeyUpdatedMsg,
    Message,
    MissingDataMsg,
    TaskErredMsg,
    TaskFinishedMsg,
)
from sluice._core.scheduler_fold import (
    ClientRecord,
    FoldedState,
    GraphError,
    SchedulerTask,
    WorkerRecord,
    ordered,
)
from sluice._core.transitions import (
    ACTIVE,
    ERRED,
    FORGOTTEN,
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
    "ClientRecord",
    "GraphError",
    "SchedulerState",
    "SchedulerTask",
    "WorkerRecord",
)

_uid = operator.attrgetter("uid")

#: Default ``worker_saturation``: root tasks a worker may hold per thread. Large
#: enough that a worker never idles between two batches of tiny tasks while its
#: results travel to the scheduler and new work comes back, even when the
#: scheduler's loop is slowed by busy sinks (64 cost ~15% of throughput with every
#: built-in sink on); small enough that a graph of a million roots stays on the
#: scheduler, not in messages and worker queues. Long tasks on a cluster that
#: grows want a small value (Dask's is 1.1): a worker holds no more than this.
DEFAULT_SATURATION = 1024.0


class SchedulerState(FoldedState):
    """The scheduler's state plus the decisions that move it (:meth:`handle`).

    ``worker_saturation``: how many tasks per thread a worker may be given while
    root tasks wait in the scheduler's queue (``math.inf``: send every ready task
    at once).
    """

    def __init__(self, worker_saturation: float = DEFAULT_SATURATION) -> None:
        super().__init__()
        if not worker_saturation > 0:
            raise ValueError(f"worker_saturation must be > 0, not {worker_saturation!r}")
        self.worker_saturation = worker_saturation
        # Ready root tasks held back while every worker is saturated: a heap of
        # (priority, uid, task). A task released while queued leaves _queued at
        # once and its heap entry when it is popped (or the heap is compacted).
        self._queue: list[tuple[int, int, SchedulerTask]] = []
        self._queued: set[SchedulerTask] = set()
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            UpdateGraph: self._h_update_graph,
            TaskFinishedMsg: self._h_task_finished,
            TaskErredMsg: self._h_task_erred,
            MissingDataMsg: self._h_missing_data,
            AddWorker: self._h_add_worker,
            RemoveWorker: self._h_remove_worker,
            AddClient: self._h_add_client,
            RemoveClient: self._h_remove_client,
            ReleaseKeys: self._h_release_keys,
            Restart: self._h_restart,
        }
        # Within one command that starts many independent tasks: how many in a row
        # may go to the same worker, and which worker took the last one (see _assign).
        self._root_run = 1
        self._root_worker: WorkerRecord | None = None
        # Context of the handle() call in progress.
        self._now = 0.0
        self._stim = ""
        self._emit_cb: Callable[[Event], None] | None = None
        self._events: list[Event] = []
        self._messages: list[Message] = []
        self._dead: WorkerRecord | None = None

    def handle(
        self, cmd: Command, *, now: float, emit: Callable[[Event], None] | None = None
    ) -> tuple[list[Event], list[Message]]:
        """Decide what ``cmd`` leads to; return the events emitted and the messages to send.

        Each event is applied as soon as it is made, then passed to ``emit``
        (inline consumers), so a consumer sees the state right after that
        event. ``now`` stamps every event: the state machine has no clock.
        Raises :class:`GraphError` for an invalid graph, having emitted nothing.
        """
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise TypeError(f"not a scheduler command: {cmd!r}")
        events: list[Event] = []
        messages: list[Message] = []
        self._now = now
        self._stim = getattr(cmd, "stimulus_id", "")
        self._emit_cb = emit
        self._events = events
        self._messages = messages
        self._dead = None
        handler(cmd)
        if self._queued:
            self._fill_from_queue()
        return events, messages

    @classmethod
    def from_events(cls, events: Iterable[Event], until: int | None = None) -> Self:
        state = super().from_events(events, until)
        # The queue is not in the log: it is every ready waiting task.
        for ts in state.tasks.values():
            if ts.state == WAITING and all(d.state == MEMORY for d in ts.dependencies):
                state._enqueue(ts)
        return state

    @property
    def queued(self) -> list[SchedulerTask]:
        """The ready tasks waiting for a worker with room, in the order they will go."""
        return sorted(self._queued, key=lambda ts: (ts.priority, ts.uid))

    # --------------------------------------------------------------- emitting

    def _push(self, event: Event) -> None:
        self.apply(event)
        self._events.append(event)
        emit = self._emit_cb
        if emit is not None:
            emit(event)

    def _move(
        self,
        ts: SchedulerTask,
        finish: str,
        worker: str | None = None,
        nbytes: int | None = None,
        duration: float | None = None,
        exception: str | None = None,
        traceback: str | None = None,
    ) -> None:
        self._push(
            TaskTransition(
                seq=self.seq + 1,
                time=self._now,
                key=ts.key,
                start=ts.state,
                finish=finish,
                stimulus_id=self._stim,
                worker=worker,
                nbytes=nbytes,
                duration=duration,
                exception=exception,
                traceback=traceback,
            )
        )

    def _free(self, worker: WorkerRecord, key: Key) -> None:
        # A dead worker cannot be told anything.
        if worker is not self._dead:
            self._messages.append(
                FreeKeysMsg(worker=worker.address, keys=(key,), stimulus_id=self._stim)
            )

    def _notify(self, ts: SchedulerTask, only: str | None = None) -> None:
        """Tell the clients that want ``ts`` (or just ``only``) that it reached memory or erred."""
        state = ts.state
        who_has = tuple(sorted(w.address for w in ts.who_has)) if state == MEMORY else ()
        append = self._messages.append
        clients = ts.who_wants if only is None else (only,)
        for client in sorted(clients) if len(clients) > 1 else clients:
            append(
                KeyUpdatedMsg(
                    client=client,
                    key=ts.key,
                    state=state,
                    who_has=who_has,
                    exception=ts.exception,
                    traceback=ts.traceback,
                )
            )

    # -------------------------------------------------------------- decisions

    def _ensure_running(self, roots: Iterable[SchedulerTask]) -> None:
        """Bring needed released tasks (and their released dependencies) back to work.

        Dependencies go first, so by the time a task is looked at its
        dependencies are in their new state.
        """
        order: list[SchedulerTask] = []
        seen: set[SchedulerTask] = set()
        for root in roots:
            if root.state != RELEASED or root in seen:
                continue
            seen.add(root)
            if not root.dependencies:
                order.append(root)
                continue
            stack = [(root, iter(ordered(root.dependencies)))]
            while stack:
                ts, deps = stack[-1]
                for dep in deps:
                    if dep.state == RELEASED and dep not in seen:
                        seen.add(dep)
                        stack.append((dep, iter(ordered(dep.dependencies))))
                        break
                else:
                    stack.pop()
                    order.append(ts)
        push = self._push
        now = self._now
        stim = self._stim
        for ts in order:
            push(
                TaskTransition(
                    seq=self.seq + 1,
                    time=now,
                    key=ts.key,
                    start=RELEASED,
                    finish=WAITING,
                    stimulus_id=stim,
                )
            )
        independent = sum(1 for ts in order if not ts.dependencies)
        if independent > 1 and self.workers:
            self._root_run = -(-independent // len(self.workers))  # ceil
        try:
            for ts in order:
                if ts.state == WAITING:
                    self._try_start(ts)
        finally:
            self._root_run = 1
            self._root_worker = None

    def _try_start(self, ts: SchedulerTask) -> None:
        """Run a waiting task whose dependencies are done, or fail it if one erred."""
        ready = True
        for dep in ts.dependencies:
            state = dep.state
            if state != MEMORY:
                if state == ERRED:
                    # Blame the oldest failed dependency, not whichever hash order finds first.
                    erred = min((d for d in ts.dependencies if d.state == ERRED), key=_uid)
                    self._fail_dependents([ts], erred)
                    return
                ready = False
        if ready:
            self._assign(ts)

    def _assign(self, ts: SchedulerTask) -> None:
        """Send a ready task to a worker.

        A task with dependencies goes where most of its input data already is,
        unless that worker is much busier than the idlest one (more than 1.5x
        its load, plus one task per thread): moving data costs more than a
        short wait, but piling a whole fan-out onto one worker would serialise
        it. Then the least loaded, then the lowest address.

        Independent tasks go to the least loaded worker, except that when one
        command starts many of them they are dealt out in contiguous runs
        (``_root_run`` each): neighbours in a graph usually meet again
        downstream (a tree reduction adds 2i and 2i+1), and then their results
        are already on the same worker.
        """
        deps = ts.dependencies
        if not deps:
            self._assign_root(ts)
            return
        workers = self.workers
        if not workers:
            self._move(ts, NO_WORKER)
            return
        best: WorkerRecord | None = None
        idlest = min(len(ws.processing) / (ws.nthreads or 1) for ws in workers.values())
        busy = 1.5 * idlest + 1
        best_rank: tuple[int, float, str] = (0, 0.0, "")
        for ws in workers.values():
            load = len(ws.processing) / (ws.nthreads or 1)
            held = 0
            if load <= busy:
                for dep in deps:
                    if ws in dep.who_has:
                        held -= 1
            rank = (held, load, ws.address)
            if best is None or rank < best_rank:
                best = ws
                best_rank = rank
        assert best is not None
        self._send(ts, best)

    def _room(self, ws: WorkerRecord) -> float:
        """How many more tasks ``ws`` may be given before root tasks wait for it."""
        if self.worker_saturation == math.inf:
            return math.inf
        return max(1, math.ceil((ws.nthreads or 1) * self.worker_saturation)) - len(ws.processing)

    def _assign_root(self, ts: SchedulerTask) -> None:
        """Send a ready root task to the least loaded worker with room, else queue it
        (with no worker at all and no queue, it is no-worker).

        Within one command that starts many roots, they are dealt out in
        contiguous runs (see :meth:`_assign`) as long as the worker has room.
        """
        best: WorkerRecord | None = None
        best_load = 0.0
        for ws in self.workers.values():
            if self._room(ws) <= 0:
                continue
            load = len(ws.processing) / (ws.nthreads or 1)
            if (
                best is None
                or load < best_load
                or (load == best_load and ws.address < best.address)
            ):
                best = ws
                best_load = load
        if best is None:
            if self.worker_saturation == math.inf:
                self._move(ts, NO_WORKER)
            else:
                self._enqueue(ts)
            return
        last = self._root_worker
        if (
            self._root_run > 1
            and last is not None
            and last.address in self.workers
            and self._room(last) > 0
            and len(last.processing) / (last.nthreads or 1) < best_load + self._root_run
        ):
            best = last
        self._root_worker = best
        self._send(ts, best)

    def _enqueue(self, ts: SchedulerTask) -> None:
        if ts not in self._queued:
            self._queued.add(ts)
            heapq.heappush(self._queue, (ts.priority, ts.uid, ts))

    def _fill_from_queue(self) -> None:
        """Give queued root tasks to the workers with room, the least loaded first.

        Each worker takes a contiguous run of the queue, so neighbouring roots
        (whose results often meet downstream) land on the same worker.
        """
        queue = self._queue
        queued = self._queued
        if len(queue) > 2 * len(queued) + 64:
            # Mostly entries of tasks released while queued: drop them.
            queue[:] = [entry for entry in queue if entry[2] in queued]
            heapq.heapify(queue)
        room = self._room
        with_room = [ws for ws in self.workers.values() if room(ws) > 0]
        if len(with_room) > 1:  # usually just the worker whose task finished
            with_room.sort(key=lambda ws: (len(ws.processing) / (ws.nthreads or 1), ws.address))
        for ws in with_room:
            free = room(ws)
            while free > 0 and queued:
                ts = heapq.heappop(queue)[2]
                if ts in queued:
                    queued.discard(ts)
                    self._send(ts, ws)
                    free -= 1
            if not queued:
                queue.clear()
                return

    def _send(self, ts: SchedulerTask, best: WorkerRecord) -> None:
        """Move ``ts`` to processing on ``best`` and tell that worker to compute it."""
        deps = ts.dependencies
        self._move(ts, PROCESSING, worker=best.address)
        who_has = (
            {d.key: tuple(sorted(w.address for w in d.who_has)) for d in ordered(deps)}
            if deps
            else {}
        )
        self._messages.append(
            ComputeTaskMsg(
                worker=best.address,
                key=ts.key,
                who_has=who_has,
                priority=ts.priority,
                stimulus_id=self._stim,
            )
        )

    def _fail_dependents(self, starts: list[SchedulerTask], failed: SchedulerTask) -> None:
        """Err ``starts`` and every waiting task downstream, blaming the root failure."""
        root = failed
        while True:  # walk down to the task that actually raised
            nxt = next((d for d in ordered(root.dependencies) if d.state == ERRED), None)
            if nxt is None:
                break
            root = nxt
        exception = f"dependency {root.key!r} failed: {root.exception}"
        stack = list(reversed(starts))
        erred: list[SchedulerTask] = []
        while stack:
            ts = stack.pop()
            if ts.state != WAITING:
                continue
            self._move(ts, ERRED, exception=exception, traceback=root.traceback)
            erred.append(ts)
            if ts.who_wants:
                self._notify(ts)
            stack.extend(reversed([d for d in ordered(ts.dependents) if d.state == WAITING]))
        # Their other dependencies may now be needed by nobody.
        self._release_unneeded([d for ts in erred for d in ordered(ts.dependencies)])

    def _release(self, ts: SchedulerTask) -> None:
        """Move a waiting/no-worker/processing/memory task to released."""
        state = ts.state
        if state == PROCESSING:
            ws = ts.processing_on
            assert ws is not None
            self._move(ts, RELEASED, worker=ws.address)
            self._free(ws, ts.key)
        elif state == MEMORY:
            holders = sorted(ts.who_has, key=lambda w: w.address)
            self._move(ts, RELEASED)
            for ws in holders:
                self._free(ws, ts.key)
        else:
            self._queued.discard(ts)
            self._move(ts, RELEASED)

    def _release_unneeded(self, candidates: Iterable[SchedulerTask]) -> None:
        """Release the candidates nobody needs, forget those nothing refers to, recursively."""
        stack = list(candidates)
        stack.reverse()
        while stack:
            ts = stack.pop()
            state = ts.state
            if state == FORGOTTEN or ts.who_wants:
                continue
            if state == ERRED:
                if ts.dependents:
                    continue
                self._move(ts, RELEASED)
            elif state != RELEASED:
                if any(d.state in ACTIVE for d in ts.dependents):
                    continue
                self._release(ts)
                stack.extend(reversed(ordered(ts.dependencies)))
            if not ts.dependents:
                self._move(ts, FORGOTTEN)
                stack.extend(reversed(ordered(ts.dependencies)))

    def _drop_results(
        self, lost: list[SchedulerTask], bounce: list[SchedulerTask]
    ) -> tuple[list[SchedulerTask], list[SchedulerTask]]:
        """Release lost results and the processing tasks that needed them.

        Returns (tasks to run again, lost results nobody needs). Whether a lost
        result is needed is decided before anything moves: once its
        dependents are released they no longer look active.
        """
        needed = [t for t in lost if t.who_wants or any(d.state in ACTIVE for d in t.dependents)]
        bounce = list(bounce)
        seen = set(bounce)
        for t in lost:
            for d in ordered(t.dependents):
                if d.state == PROCESSING and d not in seen:
                    seen.add(d)
                    bounce.append(d)
        for t in bounce:
            self._release(t)
        for t in lost:
            self._release(t)
        needed_set = set(needed)
        return bounce + needed, [t for t in lost if t not in needed_set]

    # --------------------------------------------------------------- handlers

    def _h_update_graph(self, cmd: UpdateGraph) -> None:
        tasks = self.tasks
        submitted = cmd.dependencies
        new: dict[Key, tuple[Key, ...]] = {}
        for key, kdeps in submitted.items():
            ts = tasks.get(key)
            if ts is None or ts.state == FORGOTTEN:
                new[key] = tuple(kdeps)
        check_graph(self.tasks, cmd.keys, new)
        self._push(
            GraphUpdated(
                seq=self.seq + 1,
                time=self._now,
                client=cmd.client,
                keys=tuple(cmd.keys),
                dependencies=new,
                priority={k: v for k, v in cmd.priority.items() if k in new},
                retries={k: v for k, v in cmd.retries.items() if k in new},
                stimulus_id=self._stim,
            )
        )
        wanted = [tasks[k] for k in dict.fromkeys(cmd.keys)]
        for ts in wanted:
            if ts.state == MEMORY or ts.state == ERRED:
                self._notify(ts, only=cmd.client)
        self._ensure_running(wanted)
        # Submitted tasks that no wanted key leads to are dropped straight away.
        leftovers = [ts for k in new if (ts := tasks[k]).state == RELEASED]
        if leftovers:
            self._release_unneeded(leftovers)

    def _h_task_finished(self, msg: TaskFinishedMsg) -> None:
        ws = self.workers.get(msg.worker)
        if ws is None:
            return
        ts = self.tasks.get(msg.key)
        if ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            # Stale: cancelled, reassigned, or a duplicate. We do not track
            # this copy, so the worker should drop it.
            if ts is None or ws not in ts.who_has:
                self._free(ws, msg.key)
            return
        self._push(
            TaskTransition(
                seq=self.seq + 1,
                time=self._now,
                key=ts.key,
                start=PROCESSING,
                finish=MEMORY,
                stimulus_id=self._stim,
                worker=ws.address,
                nbytes=msg.nbytes,
                duration=msg.duration,
            )
        )
        wants = ts.who_wants
        if len(wants) == 1:  # the common case, without sorting
            for client in wants:
                self._messages.append(
                    KeyUpdatedMsg(client=client, key=ts.key, state=MEMORY, who_has=(ws.address,))
                )
        elif wants:
            self._notify(ts)
        dependents = ts.dependents
        if dependents:
            for dep in ordered(dependents) if len(dependents) > 1 else dependents:
                if dep.state == WAITING:
                    self._try_start(dep)
        if ts.dependencies:
            self._release_unneeded(ordered(ts.dependencies))
        if not ts.who_wants:
            self._release_unneeded([ts])

    def _h_task_erred(self, msg: TaskErredMsg) -> None:
        ws = self.workers.get(msg.worker)
        ts = self.tasks.get(msg.key)
        if ws is None or ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            return
        finish = WAITING if ts.retries > 0 else ERRED
        self._move(
            ts,
            finish,
            worker=ws.address,
            duration=msg.duration,
            exception=msg.exception,
            traceback=msg.traceback,
        )
        if finish == WAITING:
            self._try_start(ts)
            return
        if ts.who_wants:
            self._notify(ts)
        waiting = [d for d in ordered(ts.dependents) if d.state == WAITING]
        self._fail_dependents(waiting, ts)
        self._release_unneeded([*ordered(ts.dependencies), ts])

    def _h_missing_data(self, msg: MissingDataMsg) -> None:
        if msg.worker not in self.workers:
            return
        ts = self.tasks.get(msg.key)
        if ts is None or ts.state != MEMORY:
            return
        errant = set(msg.errant_workers)
        if not any(w.address in errant for w in ts.who_has):
            return  # stale: the key was recomputed elsewhere since
        rerun, unneeded = self._drop_results([ts], [])
        self._ensure_running(rerun)
        self._release_unneeded(unneeded)

    def _h_add_worker(self, cmd: AddWorker) -> None:
        if cmd.worker in self.workers:
            return
        self._push(
            WorkerAdded(
                seq=self.seq + 1,
                time=self._now,
                worker=cmd.worker,
                name=cmd.name,
                nthreads=cmd.nthreads,
                memory_limit=cmd.memory_limit,
            )
        )
        for ts in list(self.unrunnable):
            self._assign(ts)

    def _h_remove_worker(self, cmd: RemoveWorker) -> None:
        ws = self.workers.get(cmd.worker)
        if ws is None:
            return
        self._dead = ws
        lost = ordered(t for t in ws.has_what if len(t.who_has) == 1)
        rerun, unneeded = self._drop_results(lost, ordered(ws.processing))
        self._push(
            WorkerRemoved(
                seq=self.seq + 1,
                time=self._now,
                worker=cmd.worker,
                reason=cmd.reason,
                stimulus_id=self._stim,
            )
        )
        self._dead = None
        self._ensure_running(rerun)
        self._release_unneeded(unneeded)

    def _h_add_client(self, cmd: AddClient) -> None:
        if cmd.client in self.clients:
            return
        self._push(ClientAdded(seq=self.seq + 1, time=self._now, client=cmd.client))

    def _h_remove_client(self, cmd: RemoveClient) -> None:
        client = self.clients.get(cmd.client)
        if client is None:
            return
        wanted = ordered(client.wants_what)
        self._push(ClientRemoved(seq=self.seq + 1, time=self._now, client=cmd.client))
        self._release_unneeded(wanted)

    def _h_release_keys(self, cmd: ReleaseKeys) -> None:
        client = self.clients.get(cmd.client)
        if client is None:
            return
        tasks = self.tasks
        released = [
            ts
            for key in dict.fromkeys(cmd.keys)
            if (ts := tasks.get(key)) is not None and cmd.client in ts.who_wants
        ]
        if not released:
            return
        self._push(
            ClientReleasedKeys(
                seq=self.seq + 1,
                time=self._now,
                client=cmd.client,
                keys=tuple(ts.key for ts in released),
                stimulus_id=self._stim,
            )
        )
        self._release_unneeded(released)

    def _h_restart(self, cmd: Restart) -> None:
        append = self._messages.append
        for name in sorted(self.clients):
            for ts in ordered(self.clients[name].wants_what):
                append(KeyUpdatedMsg(client=name, key=ts.key, state=FORGOTTEN))
        for address in sorted(self.workers):
            ws = self.workers[address]
            keys = tuple(t.key for t in ordered(ws.processing | ws.has_what))
            if keys:
                append(FreeKeysMsg(worker=address, keys=keys, stimulus_id=self._stim))
        self._push(Restarted(seq=self.seq + 1, time=self._now, stimulus_id=self._stim))
        self._queue.clear()
        self._queued.clear()
