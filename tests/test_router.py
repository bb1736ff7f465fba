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


def test_slow_health_probes_take_a_busy_replica_out_only_after_three_in_a_row() -> None:
    import asyncio
    import time

    import httpx

    from shipyard.router.health import SLOW_PROBES_TO_UNREADY, probe

    answers: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        kind = answers.pop(0)
        if kind == "slow":
            raise httpx.ReadTimeout("slow", request=request)
        if kind == "refused":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})

    async def run(*kinds: str) -> list[bool]:
        seen = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            for kind in kinds:
                answers.extend(["ok", "ok"] if kind == "ok" else [kind])
                await probe(client, replica)
                seen.append(replica.ready)
        return seen

    replica = Replica("http://engine:1")
    replica.last_byte_at = time.monotonic() + 3600  # busy: its answers keep making progress
    assert SLOW_PROBES_TO_UNREADY == 3
    # a starting replica that answers late stays unready; a served one survives two slow answers, not three
    assert asyncio.run(run("slow", "ok", "slow", "slow", "ok", "slow", "slow", "slow")) == [
        *(False, True, True, True, True, True, True, False)
    ]
    assert "3 health probe(s) in a row timed out" in replica.last_error
    assert asyncio.run(run("ok", "refused")) == [True, False]  # a refused connection: out at once
    replica.last_byte_at = 0.0  # nothing in flight here: no evidence of a hang (an idle gateway worker)
    assert asyncio.run(run("ok", "slow")) == [True, True]
    replica.in_flight = 1  # hung: late on /health, and the answers this process waits for made no progress
    assert asyncio.run(run("ok", "slow")) == [True, False]


def test_an_ejected_replica_stays_out_for_a_hold_down_that_doubles_unless_it_is_the_only_one() -> None:
    """Issue 34 item 11: the next 200 on /health put an ejected replica back at once (Envoy holds it out for
    base x ejections); with no other replica ready it comes back at once (Envoy's panic threshold)."""
    import asyncio
    import time

    import httpx

    from shipyard.router.health import probe
    from shipyard.router.replica import EJECTION_BASE_S

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})

    flaky, steady = Replica("http://flaky:1", name="flaky"), Replica("http://steady:1", name="steady")
    pool = ReplicaPool([flaky, steady])

    async def probed(replica: Replica) -> bool:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await probe(client, replica, pool=pool)
        return replica.ready

    assert asyncio.run(probed(flaky)) and asyncio.run(probed(steady))
    pool.eject(flaky, "hung")
    assert not asyncio.run(probed(flaky)) and "held out" in flaky.last_error
    first = flaky.held_out_until
    flaky.held_out_until = time.monotonic() - 0.01  # the hold-down passed
    assert asyncio.run(probed(flaky))
    pool.eject(flaky, "hung again")
    assert flaky.ejections == 2 and flaky.held_out_until - first >= EJECTION_BASE_S  # doubled (4 s, was 2 s)
    steady.ready = False  # the only one left: back at once
    assert asyncio.run(probed(flaky))
