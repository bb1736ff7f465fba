"""The scaler's lease lost in the middle of a scale-out (issue 35). Promise checked: a gateway that loses the
model's lease while its new replica starts stops that engine and acts no further; the record it could no longer
save away (its saves are fenced) is finished by the next owner of the lease, which removes it and never routes to
it: nothing is left `starting` for ever, and no engine is left running unrecorded."""

from __future__ import annotations

import asyncio

from tests.test_control import RecordingStore, until
from tests.test_scaler import RoomyLauncher, gateway, seeded


def test_a_scale_out_whose_lease_is_taken_stops_its_engine_and_the_next_owner_removes_the_record() -> None:
    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        a = gateway(store, launcher, gateway_id="gw-a")
        await a.start()
        await a.scale(2, "admin:test")
        await until(lambda: a.state.replica("blue-v1-2") is not None, timeout=15)  # recorded `starting`, engine starts
        assert a.state.replica("blue-v1-2").rotation == "starting"  # type: ignore[union-attr]
        store._lease = None  # the lease is taken from under gateway a (its TTL ran out in a partition)
        assert await store.acquire_lease("gw-b", 60) is not None
        await until(lambda: launcher.launched["blue-v1-2"].stopped, timeout=15)  # a stops the engine it started
        assert a.state.replica("blue-v1-2") is not None  # a could not save it away: not its lease any more
        assert all(r.name != "blue-v1-2" for r in a.pool.replicas if r.routable)
        await a.stop()
        # a gateway that stops takes its load report with it (it expires at once, not after its 2 s TTL): nobody
        # waits for it to apply a revision or counts requests it no longer has
        await asyncio.sleep(0.02)
        assert all(report.gateway != "gw-a" for report in await store.load_reports())

        b = gateway(store, RoomyLauncher(), gateway_id="gw-b")  # the owner of the lease now
        await b.start()
        await until(lambda: b.state.replica("blue-v1-2") is None, timeout=15)
        settled = [e for e in b.audit.entries if e["action"] == "replica_settled"]
        assert [(e["replica"], e["was"]) for e in settled] == [("blue-v1-2", "starting")]
        await b.stop()

    asyncio.run(body())
