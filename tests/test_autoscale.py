"""The autoscaler's decision on recorded load traces (issue 35, first part): how fast it reacts to a step, that a
spike starts nothing, that a sine load a naive threshold scaler flaps on keeps its replicas, that scale-in waits
for its window and halves at most, and that a model at zero wakes on its first request."""

from __future__ import annotations

import math

import pytest

from shipyard.control.autoscale import AutoscalePolicy, Autoscaler, Load

POLICY = AutoscalePolicy(min_replicas=1, max_replicas=4, target_waiting=2, target_kv_cache=None, scale_in_after_s=60)


def run(policy: AutoscalePolicy, waiting_at: list[float], start: int = 1) -> list[int]:
    """Replicas after each one-second observation of ``waiting_at`` (total requests waiting)."""
    scaler, replicas, seen = Autoscaler(policy), start, []
    for second, waiting in enumerate(waiting_at):
        replicas = scaler.decide(Load(at=float(second), replicas=replicas, waiting=waiting, requests=waiting)).replicas
        seen.append(replicas)
    return seen


def test_a_step_is_answered_within_the_short_window_and_a_panic_at_once() -> None:
    step = [0.0] * 30 + [3.0] * 30  # 1.5x the target on one replica from t=30
    seen = run(POLICY, step)
    out = seen.index(2)
    assert 30 <= out <= 30 + POLICY.scale_out_after_s + 1, seen
    panic = [0.0] * 30 + [10.0] * 5  # 5x: the SLO is already broken
    assert run(POLICY, panic)[30] == 2  # doubled on the first observation


def test_a_one_sample_spike_starts_nothing() -> None:
    assert set(run(POLICY, [0.0] * 20 + [3.5] + [0.0] * 20)) == {1}


def test_a_sine_load_keeps_its_replicas_where_a_threshold_scaler_flaps() -> None:
    sine = [max(0.0, 2.6 + 2.2 * math.sin(second / 8)) for second in range(600)]
    decided = run(POLICY, sine, start=2)
    changes = sum(a != b for a, b in zip(decided, decided[1:], strict=False))
    replicas, flaps = 2, 0  # out above the target per replica, in below it: every crossing moves
    for waiting in sine:
        wanted = replicas + 1 if waiting / replicas > 2 else replicas - 1 if waiting / replicas < 1.8 else replicas
        wanted = min(max(wanted, 1), 4)
        flaps += wanted != replicas
        replicas = wanted
    assert flaps >= 20 and changes <= 3, (flaps, changes)


def test_a_ramp_is_followed_one_step_at_a_time_and_never_back_down_while_it_rises() -> None:
    ramp = [second * 12 / 120 for second in range(180)]  # 0 -> 12 waiting over two minutes, then held
    seen = run(POLICY, ramp)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)), seen  # no scale-in on the way up
    ups = [second for second in range(1, len(seen)) if seen[second] != seen[second - 1]]
    assert [seen[s] for s in ups] == [2, 3, 4]  # each replica added once, in order, up to max_replicas
    for second in ups:  # each added within the short window of the load first asking for it
        asked = next(t for t in range(second + 1) if ramp[t] / seen[second - 1] > 2 * (1 + POLICY.tolerance))
        assert second - asked <= POLICY.scale_out_after_s + 1, (second, asked)


def test_windows_hold_on_a_real_clock_whose_ticks_never_land_on_the_window_edge() -> None:
    """Seen on the CPU run of 2026-12-07: with observations at 1.03 s steps, the window was never "covered" (its
    oldest kept observation was always younger than the window), so scale-in never came."""
    scaler, replicas = Autoscaler(POLICY), 2
    seen = []
    for tick in range(120):
        at = 0.37 + tick * 1.03
        replicas = scaler.decide(Load(at=at, replicas=replicas, waiting=0.0, requests=1)).replicas
        seen.append((round(at, 2), replicas))
    scaled_in_at = next(at for at, n in seen if n == 1)
    assert POLICY.scale_in_after_s <= scaled_in_at - 0.37 <= POLICY.scale_in_after_s + 2.5, seen


def test_scale_in_waits_for_its_window_and_halves_at_most() -> None:
    seen = run(POLICY, [0.0] * 200, start=4)
    assert seen[:59] == [4] * 59  # the window is not covered yet
    assert seen[60] == 2 and min(seen) == 1  # then at most halving per step, down to min_replicas


def test_a_model_at_zero_wakes_on_its_first_request_and_idles_back_to_zero() -> None:
    policy = AutoscalePolicy(
        min_replicas=0, max_replicas=2, target_waiting=2, target_kv_cache=None, scale_in_after_s=30
    )
    scaler = Autoscaler(policy)
    assert scaler.decide(Load(at=0.0, replicas=0)).replicas == 0
    assert scaler.decide(Load(at=1.0, replicas=0, waiting=1, requests=1)).replicas == 1
    replicas = 1
    for second in range(2, 40):
        replicas = scaler.decide(Load(at=float(second), replicas=replicas)).replicas
    assert replicas == 0


def test_a_policy_without_a_target_or_with_an_empty_range_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        AutoscalePolicy(target_waiting=None, target_kv_cache=None)
    with pytest.raises(ValueError, match="is empty"):
        AutoscalePolicy(min_replicas=3, max_replicas=2)


def test_a_latency_slo_scales_out_when_broken_and_never_holds_replicas_the_load_does_not_need() -> None:
    policy = AutoscalePolicy(
        min_replicas=1, max_replicas=2, target_waiting=None, target_kv_cache=None, target_in_flight=4,
        ttft_p90_ms=600, scale_in_after_s=30,
    )  # fmt: skip
    scaler, replicas = Autoscaler(policy), 1
    for second in range(10):  # 2 in flight (half the target) but TTFT at 1.5x its SLO: out after the window
        replicas = scaler.decide(Load(at=float(second), replicas=replicas, requests=2, ttft_p90_ms=900)).replicas
    assert replicas == 2
    for second in range(10, 60):  # one request left, TTFT at its floor (0.8x the SLO): in, once the window passed
        replicas = scaler.decide(Load(at=float(second), replicas=replicas, requests=1, ttft_p90_ms=480)).replicas
    assert replicas == 1
