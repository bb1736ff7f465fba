from __future__ import annotations

import pytest

from shipyard.router import NoReplicaError, Replica, ReplicaPool, UnknownModelError, pick_least_in_flight


def replica(
    name: str, *, ready: bool = True, in_flight: int = 0, models: dict[str, int | None] | None = None
) -> Replica:
    return Replica(
        f"http://{name}/",
        name=name,
        ready=ready,
        in_flight=in_flight,
        models={"m": 4096} if models is None else models,
    )


def test_least_in_flight_skips_unready_and_breaks_ties_by_order() -> None:
    a, b, c = replica("a", in_flight=3), replica("b", in_flight=1), replica("c", ready=False)
    assert pick_least_in_flight([a, b, c]) is b
    assert pick_least_in_flight([replica("x"), replica("y")]).name == "x"  # type: ignore[union-attr]
    assert pick_least_in_flight([c]) is None


def test_pool_choose_by_model_and_exclusion() -> None:
    a, b = replica("a", in_flight=0), replica("b", in_flight=5, models={"m": 2048, "n": 2048})
    pool = ReplicaPool([a, b])
    assert pool.choose("m") is a
    assert pool.choose("m", exclude=frozenset({"a"})) is b
    assert pool.choose("n") is b
    with pytest.raises(UnknownModelError):
        pool.choose("zzz")
    b.ready = False
    with pytest.raises(NoReplicaError):
        pool.choose("n")


def test_pool_models_take_smallest_context_among_ready() -> None:
    pool = ReplicaPool(
        [
            replica("a", models={"m": 4096}),
            replica("b", models={"m": 2048}),
            replica("c", ready=False, models={"m": 512, "x": 1}),
        ]
    )
    assert pool.models() == {"m": 2048}


def test_replica_url_normalised_and_named() -> None:
    assert Replica("http://h:1/").url == "http://h:1"
    assert Replica("http://h:1/").name == "http://h:1"
