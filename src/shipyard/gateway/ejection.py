"""Waiting on a replica only while it is in rotation: its ejection (hung, gone) cuts every wait on it short.

One mechanism for a request waiting for its answer's headers, for a body being read, and for a stream being
relayed: an anyio cancel scope that the replica's outage future cancels (no extra task per request).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from shipyard.router import Replica


class ReplicaEjected(Exception):
    """The replica a request waited on was ejected (hung or gone) before it answered."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica.last_error or f"replica {replica.name} was ejected")


@contextlib.contextmanager
def until_ejected(replica: Replica) -> Iterator[anyio.CancelScope]:
    """Run the block unless ``replica`` is ejected first: then it is cancelled (an upstream read or write in it
    closes its connection) and the scope's ``cancelled_caught`` is True.

    >>> with until_ejected(replica) as watch:                                 # doctest: +SKIP
    ...     answer = await client.send(request, stream=True)
    >>> if watch.cancelled_caught: ...                                        # doctest: +SKIP
    """
    outage = replica.outage()
    with anyio.CancelScope() as scope:

        def eject(_: object) -> None:
            scope.cancel()

        outage.add_done_callback(eject)
        try:
            yield scope
        finally:
            outage.remove_done_callback(eject)
