"""Cache-aware routing (issue 23): a conversation's turns go to the replica holding its prefix, from every gateway
process and every gateway, unless that replica is overloaded; the decision shows in metrics and headers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from shipyard.gateway import create_app
from shipyard.router import Replica, ReplicaPool, route_request, routing_policy
from shipyard.router.policy import CacheAware, RouteRequest
from shipyard.settings import load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, wait_for

KEY = "sk-route"


@dataclass
class Engine:
    name: str
    in_flight: int = 0
    ready: bool = True


def conversation(n: int, turns: int) -> list[dict[str, str]]:
    """The request of turn ``turns`` of conversation ``n`` (its history, then a new question)."""
    messages = [{"role": "system", "content": "You are a support assistant. " * 50}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"conversation {n} question {turn}"})
        messages.append({"role": "assistant", "content": f"answer {turn}"})
    messages.append({"role": "user", "content": f"conversation {n} question {turns}"})
    return messages


def prefix_key(body: dict[str, Any]) -> str | None:
    return route_request(body).prefix


def opens_conversation(body: dict[str, Any]) -> bool:
    return route_request(body).opening


def test_every_turn_of_a_conversation_has_the_key_of_its_first() -> None:
    keys = {prefix_key({"model": "m", "messages": conversation(7, turns)}) for turns in range(1, 5)}
    assert len(keys) == 1 and None not in keys
    first = {"model": "m", "messages": conversation(7, 0)}  # system + the opening question: cached nowhere yet
    assert prefix_key(first) in keys and opens_conversation(first)  # the key its later turns will have
    assert not opens_conversation({"model": "m", "messages": conversation(7, 1)})
    assert not opens_conversation({"model": "m", "prompt": "text"})
    later = {"model": "m", "messages": conversation(7, 2)}
    assert route_request(first, "s") == RouteRequest(prefix_key(first), "s", opening=True)
    assert route_request(later) == RouteRequest(prefix_key(later), None, opening=False)
    assert prefix_key({"model": "m", "messages": conversation(8, 1)}) not in keys  # another conversation
    assert prefix_key({"model": "other", "messages": conversation(7, 1)}) not in keys  # another model
    grown = "Document: " + "x" * 5000
    assert prefix_key({"model": "m", "prompt": grown + " Q1"}) == prefix_key({"model": "m", "prompt": grown + " Q2"})
    assert prefix_key({"model": "m", "input": "an embedding"}) is None


def test_conversations_behind_one_long_system_prompt_get_keys_of_their_own() -> None:
    """Issue 34 item 8: the key read the first ~16K characters, so a longer shared system prompt gave every
    conversation behind it one key, and all of them one replica."""
    system = {"role": "system", "content": "You follow the handbook. " * 2000}  # 50,000 characters

    def opening(n: int) -> dict[str, Any]:
        return {"model": "m", "messages": [system, {"role": "user", "content": f"customer {n} asks"}]}

    keys = {prefix_key(opening(n)) for n in range(50)}
    assert len(keys) == 50
    later = {"model": "m", "messages": [*opening(3)["messages"], {"role": "assistant", "content": "a"}]}
    later["messages"].append({"role": "user", "content": "and then?"})
    assert prefix_key(later) == prefix_key(opening(3))  # a conversation still keeps its key
    spread = Counter(CacheAware().pick([Engine("a"), Engine("b")], RouteRequest(k))[0].name for k in keys)  # type: ignore[union-attr]
    assert min(spread.values()) >= 15, spread


def test_the_overload_guard_counts_what_the_other_gateways_send_to_a_replica() -> None:
    """Issue 34 item 8: the guard compared this process's own counts only, so N gateway processes could each put
    64 more on the preferred replica; the load the others report counts too."""

    @dataclass
    class Shared(Engine):
        elsewhere_in_flight: int = 0

    policy = CacheAware(balance_abs=4, balance_rel=1.5)
    engines = [Shared("a"), Shared("b")]
    key = next(f"c{i}" for i in range(100) if policy.pick(engines, RouteRequest(f"c{i}"))[0].name == "a")  # type: ignore[union-attr]
    engines[0].in_flight, engines[1].in_flight = 2, 1  # here: barely busier
    assert policy.pick(engines, RouteRequest(key)) == (engines[0], "prefix")
    engines[0].elsewhere_in_flight = 30  # the other gateways keep it full
    assert policy.pick(engines, RouteRequest(key)) == (engines[1], "overloaded")


def test_cache_aware_sends_a_key_to_one_replica_whatever_the_order_and_spreads_keys() -> None:
    policy = CacheAware()
    engines = [Engine("blue-v1"), Engine("blue-v1-2"), Engine("blue-v1-3")]
    for key in (f"conversation-{i}" for i in range(30)):
        first, reason = policy.pick(engines, RouteRequest(key))
        again, _ = policy.pick(list(reversed(engines)), RouteRequest(key))  # another gateway lists them otherwise
        assert first is again and reason == "prefix"
    spread = Counter(policy.pick(engines, RouteRequest(f"c{i}"))[0].name for i in range(300))  # type: ignore[union-attr]
    assert set(spread) == {"blue-v1", "blue-v1-2", "blue-v1-3"} and min(spread.values()) > 60


def test_a_replica_leaving_moves_only_its_own_conversations() -> None:
    policy = CacheAware()
    engines = [Engine("a"), Engine("b"), Engine("c")]
    before = {i: policy.pick(engines, RouteRequest(f"c{i}"))[0].name for i in range(200)}  # type: ignore[union-attr]
    after = {i: policy.pick(engines[:2], RouteRequest(f"c{i}"))[0].name for i in range(200)}  # type: ignore[union-attr]
    assert all(after[i] == name for i, name in before.items() if name != "c")


def test_an_overloaded_replica_gives_the_request_to_the_least_busy_one() -> None:
    policy = CacheAware(balance_abs=4, balance_rel=1.5)
    engines = [Engine("a"), Engine("b")]
    key = next(f"c{i}" for i in range(100) if policy.pick(engines, RouteRequest(f"c{i}"))[0].name == "a")  # type: ignore[union-attr]
    engines[0].in_flight, engines[1].in_flight = 5, 2  # 3 more: under the absolute threshold
    assert policy.pick(engines, RouteRequest(key)) == (engines[0], "prefix")
    engines[0].in_flight = 7  # 5 more and 3.5 times as many: overloaded
    assert policy.pick(engines, RouteRequest(key)) == (engines[1], "overloaded")
    engines[0].ready = False
    assert policy.pick(engines, RouteRequest(key)) == (engines[1], "prefix")  # not ready: the next by hash
    assert policy.pick([Engine("a", 3), Engine("b", 1)], RouteRequest(None)) == (Engine("b", 1), "least_busy")


def test_a_first_turn_goes_where_its_later_turns_will_unless_that_unbalances() -> None:
    """The promise: a conversation's first turn lands on the replica its later turns hash to (so the second turn
    finds its history) only while that costs little balance — a share of the least busy replica's load, so with
    few requests running only a tie goes home and unique prompts are balanced as least-busy balances them."""
    policy = CacheAware(opening_slack=0.25)
    engines = [Engine("a"), Engine("b")]
    key = next(f"c{i}" for i in range(100) if policy.pick(engines, RouteRequest(f"c{i}"))[0].name == "a")  # type: ignore[union-attr]
    assert policy.pick(engines, RouteRequest(key, opening=True)) == (engines[0], "opening")  # a tie: home
    engines[0].in_flight = 1  # one more than an idle replica: balance first, a first turn is cached nowhere yet
    assert policy.pick(engines, RouteRequest(key, opening=True)) == (engines[1], "least_busy")
    assert policy.pick(engines, RouteRequest(key)) == (engines[0], "prefix")  # a later turn: its history is there
    engines[0].in_flight, engines[1].in_flight = 10, 8  # 2 more, within a quarter of 8: home
    assert policy.pick(engines, RouteRequest(key, opening=True)) == (engines[0], "opening")
    engines[0].in_flight = 11  # 3 more: the least busy
    assert policy.pick(engines, RouteRequest(key, opening=True)) == (engines[1], "least_busy")
    engines[0].in_flight = 9  # home would take it, unless first turns always go to the least busy
    assert CacheAware(opening_slack=-1).pick(engines, RouteRequest(key, opening=True)) == (engines[1], "least_busy")
    for running in (2, 16):  # unique first turns arriving one after another: kept as balanced as least-busy keeps them
        loads = {"a": 0, "b": 0}
        for i in range(running):
            chosen, _ = policy.pick([Engine(n, loads[n]) for n in loads], RouteRequest(f"u{i}", opening=True))
            loads[chosen.name] += 1  # type: ignore[union-attr]
            assert abs(loads["a"] - loads["b"]) <= 1 + 0.25 * min(loads.values())


def test_the_policies_by_name() -> None:
    engines = [Engine("a", 1), Engine("b", 0)]
    assert routing_policy("least-busy").pick(engines, RouteRequest("k"))[0] is engines[1]
    picks = routing_policy("round-robin")
    assert {picks.pick(engines, RouteRequest("k"))[0].name for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]
    sticky = routing_policy("session")
    assert sticky.pick(engines, RouteRequest(None, "user-1"))[1] == "session"
    with pytest.raises(ValueError):
        routing_policy("random")


@pytest.fixture
def two_gateways() -> Iterator[tuple[list[str], list[str]]]:
    """Two gateways (as two hosts would run them) over the same two replicas, listed in opposite orders."""
    engines = [ServerThread(FakeOpenAI("m")) for _ in range(2)]
    for engine in engines:
        engine.__enter__()
    replicas = [(e.url, f"blue-v1{'-2' if i else ''}") for i, e in enumerate(engines)]
    gateways = []
    try:
        for order in (replicas, list(reversed(replicas))):
            settings = load_settings(api_keys=KEY, health_interval_s=0.2)
            app = create_app(
                settings, [Replica(url, name=name, deployment="blue", version="v1") for url, name in order]
            )
            gateway = ServerThread(app)
            gateway.__enter__()
            gateways.append(gateway)
            assert wait_for(lambda g=gateway: httpx.get(f"{g.url}/ready").status_code == 200, timeout=10)
        yield [g.url for g in gateways], [name for _, name in replicas]
    finally:
        for server in [*gateways, *engines]:
            server.__exit__(None, None, None)


def test_a_conversation_keeps_its_replica_across_gateways_and_the_choice_is_counted(
    two_gateways: tuple[list[str], list[str]],
) -> None:
    urls, names = two_gateways
    seen: dict[int, set[str]] = {}
    for n in range(12):
        for turn in range(5):  # the first turn, then the turns that continue the conversation
            url = urls[turn % 2]  # each turn through the other gateway
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "m", "messages": conversation(n, turn), "max_tokens": 2},
                headers={"Authorization": f"Bearer {KEY}"},
            )
            assert answer.status_code == 200
            seen.setdefault(n, set()).add(answer.headers["x-shipyard-replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert {r for replicas in seen.values() for r in replicas} == set(names)  # and the conversations spread
    metrics = httpx.get(f"{urls[0]}/metrics").text
    assert 'shipyard_route_decisions_total{model="m",reason="opening"} 12.0' in metrics  # turns 0
    assert 'shipyard_route_decisions_total{model="m",reason="prefix"} 24.0' in metrics  # turns 2 and 4


def test_least_busy_is_still_there_and_ignores_the_prefix() -> None:
    pool = ReplicaPool(
        [Replica("http://a", name="a", deployment="blue"), Replica("http://b", name="b", deployment="blue")],
        routing=routing_policy("least-busy"),
    )
    for replica in pool.replicas:
        replica.ready, replica.models = True, {"m": None}
    pool.replicas[0].in_flight = 3
    assert pool.route("m", request=RouteRequest("any")) == (pool.replicas[1], "least_busy")
