"""Overload that sheds: a bound on what each replica is given, and a short queue with a deadline in front of it.

Each replica takes at most ``limit`` requests at a time from this gateway process (counting what the other
gateways last reported on it): a number set by the operator, or learned from its latency by :class:`Gradient`
(Netflix concurrency-limits' Gradient2; the idea of Envoy's adaptive concurrency filter). A request that finds
every replica of its model full waits in the model's :class:`AdmissionQueue`, ordered by its key's priority
(lower first, as vLLM's) and then by arrival, for at most ``timeout_s``; the queue holds at most ``size``
requests. Past that the answer comes at once: :class:`Overloaded` (the gateway's 503 with ``Retry-After``), so an
engine is never pushed past its knee and no backlog outlives an overload.

>>> queue = AdmissionQueue(size=2, timeout_s=0.05)
>>> await queue.wait(QueueTicket(priority=0))   # doctest: +SKIP  (woken by queue.wake() when a slot frees)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

from shipyard.settings import AdmissionSettings


class Overloaded(Exception):
    """No replica has room and the request could not wait: ``reason`` is ``queue_full``, ``queue_timeout`` or
    ``displaced`` (a request of a better priority took its place in a full queue)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Gradient:
    """A replica's concurrency limit learned from its latency (Gradient2 of Netflix's concurrency-limits).

    Latency samples (seconds from sending a request to its answer's headers) are averaged per window; the
    long-run average ``long_rtt`` (an exponential average over ``long_window`` windows) stands for the latency
    without queueing. Each window: ``gradient = clamp(tolerance * long_rtt / short_rtt, 0.5, 1)`` and the limit
    moves toward ``limit * gradient + sqrt(limit)`` (``smoothing``): it grows by about its square root while latency
    holds, and shrinks as soon as queueing makes latency climb past ``tolerance`` times the usual. It grows only
    while it is used (more than half of it in flight), so a quiet replica keeps the limit it earned.
    """

    limit: float = 32.0
    min_limit: float = 1.0
    max_limit: float = 1024.0
    tolerance: float = 1.5
    smoothing: float = 0.2
    long_window: int = 100
    window_s: float = 0.25
    window_samples: int = 10
    long_rtt: float = 0.0
    _sum: float = 0.0
    _count: int = 0
    _window_started: float = field(default_factory=time.monotonic)
    _max_in_flight: int = 0

    def sample(self, rtt_s: float, in_flight: int) -> None:
        """One answer's latency; ``in_flight`` is the replica's load when it was sent."""
        self._sum += rtt_s
        self._count += 1
        self._max_in_flight = max(self._max_in_flight, in_flight)
        now = time.monotonic()
        if self._count < self.window_samples or now - self._window_started < self.window_s:
            return
        short = self._sum / self._count
        used = self._max_in_flight
        self._sum, self._count, self._max_in_flight, self._window_started = 0.0, 0, 0, now
        if self.long_rtt == 0.0:
            self.long_rtt = short
            return
        self.long_rtt += (short - self.long_rtt) / self.long_window
        if self.long_rtt / short > 2:  # latency fell a lot (the load went away): forget the old baseline faster
            self.long_rtt *= 0.95
        gradient = max(0.5, min(1.0, self.tolerance * self.long_rtt / short))
        if gradient >= 1.0 and used < self.limit / 2:
            return  # not used enough to know whether more would hold
        target = self.limit * gradient + math.sqrt(self.limit)
        limit = self.limit * (1 - self.smoothing) + target * self.smoothing
        self.limit = max(self.min_limit, min(self.max_limit, limit))


@dataclass
class QueueTicket:
    """One request's place in a queue: its priority, its order of arrival and when it first waited."""

    priority: int = 0
    seq: int | None = None
    started: float = 0.0

    @property
    def waited_s(self) -> float:
        return time.monotonic() - self.started if self.seq is not None else 0.0


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class AdmissionQueue:
    """The requests of one model waiting for a replica with room, best priority first, then oldest."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    async def wait(self, ticket: QueueTicket) -> None:
        """Wait to be woken (a slot freed). A request woken that lost the freed slot to another comes back with
        the same ticket: it keeps its place and its deadline. Raises :class:`Overloaded` when the queue is full of
        requests as good as this one, when one better displaces it, or at its deadline."""
        now = time.monotonic()
        if ticket.seq is None:
            ticket.seq, ticket.started = next(self._seq), now
            self._prune()
            if len(self._heap) >= self.size:
                worst = max(self._heap) if self._heap else None
                if worst is None or worst.priority <= ticket.priority:
                    raise Overloaded("queue_full", f"{self.size} requests are already waiting for a replica")
                self._heap.remove(worst)  # a better priority takes the place of the worst waiting one
                heapq.heapify(self._heap)
                worst.future.set_exception(
                    Overloaded("displaced", "a request of a higher priority took this one's place in the queue")
                )
        remaining = ticket.started + self.timeout_s - now
        if remaining <= 0:
            raise Overloaded("queue_timeout", f"no replica had room within {self.timeout_s * 1000:g} ms")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, _Waiter(ticket.priority, ticket.seq, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), remaining)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:  # woken at the deadline
                return
            future.cancel()
            self._prune()
            raise Overloaded("queue_timeout", f"no replica had room within {self.timeout_s * 1000:g} ms") from None
        except BaseException:
            if not future.done():
                future.cancel()
            elif not future.cancelled() and future.exception() is None:
                self.wake()  # woken, then cancelled: hand the slot on
            self._prune()
            raise

    def wake(self) -> None:
        """A slot freed: the best waiting request goes (re-routing picks the replica with room)."""
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if not waiter.future.done():
                waiter.future.set_result(None)
                return

    def _prune(self) -> None:
        if any(w.future.done() for w in self._heap):
            self._heap = [w for w in self._heap if not w.future.done()]
            heapq.heapify(self._heap)


@dataclass
class AdmissionPolicy:
    """One model's bound per replica (``max_in_flight``: a number, or ``adaptive``: a :class:`Gradient` per
    replica starting at ``initial``) and its waiting queue."""

    queue: AdmissionQueue
    max_in_flight: int | None = None
    adaptive: bool = False
    initial: float = 32.0
    min_limit: float = 1.0
    max_limit: float = 1024.0
    gradients: dict[str, Gradient] = field(default_factory=dict)

    def limit(self, name: str) -> float | None:
        """The requests replica ``name`` may have at once (None: no bound)."""
        if self.adaptive:
            return self._gradient(name).limit
        return self.max_in_flight

    def has_room(self, name: str, in_flight: int) -> bool:
        limit = self.limit(name)
        return limit is None or in_flight < limit

    def sample(self, name: str, rtt_s: float, in_flight: int) -> None:
        if self.adaptive:
            self._gradient(name).sample(rtt_s, in_flight)

    def _gradient(self, name: str) -> Gradient:
        gradient = self.gradients.get(name)
        if gradient is None:
            gradient = self.gradients[name] = Gradient(
                limit=self.initial, min_limit=self.min_limit, max_limit=self.max_limit
            )
        return gradient


def admission_policy(settings: AdmissionSettings) -> AdmissionPolicy | None:
    """The policy of one model's pool from its ``admission:`` settings (None: no bound, no queue)."""
    if settings.max_in_flight is None:
        return None
    adaptive = settings.max_in_flight == "adaptive"
    return AdmissionPolicy(
        AdmissionQueue(settings.queue_size, settings.queue_timeout_s),
        max_in_flight=None if adaptive else int(settings.max_in_flight),
        adaptive=adaptive,
        initial=float(settings.adaptive_initial),
        max_limit=float(settings.adaptive_max),
    )
