"""EngineSpec -> vLLM flags, and EngineProcess driving a real child process (the fake server stands in)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from shipyard.engine import EngineProcess, EngineSpec, EngineStartError, Profile, last_error
from shipyard.settings import load_settings
from tests.helpers import wait_for


def test_only_set_fields_become_flags() -> None:
    spec = EngineSpec(
        model="/m",
        served_model_name="m",
        max_model_len=2048,
        enable_prefix_caching=False,
        enforce_eager=True,
        kv_cache_dtype="fp8",
        tensor_parallel_size=2,
        extra_args=("--seed", "1"),
    )
    assert spec.vllm_args(8001) == [
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--served-model-name",
        "m",
        "--max-model-len",
        "2048",
        "--no-enable-prefix-caching",
        "--kv-cache-dtype",
        "fp8",
        "--tensor-parallel-size",
        "2",
        "--enforce-eager",
        "--seed",
        "1",
    ]


def test_profile_fills_unset_fields_and_explicit_values_win() -> None:
    cpu = EngineSpec.from_profile("cpu", model="/m")
    assert cpu.enforce_eager is True and cpu.gpu_memory_utilization == 0.3 and cpu.dtype == "float32"
    assert EngineSpec.from_profile(Profile.CPU, model="/m", gpu_memory_utilization=0.5).gpu_memory_utilization == 0.5
    assert EngineSpec.from_profile("default", model="/m").vllm_args(1) == [
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
    ]


def test_measured_gpu_profiles_and_prequantized_checkpoints(tmp_path: Path) -> None:
    latency = EngineSpec.from_profile("latency", model="/m")
    assert (latency.quantization, latency.enable_prefix_caching, latency.max_num_batched_tokens) == ("fp8", True, 2048)
    assert latency.vllm_args(1)[-5:] == [
        "--quantization",
        "fp8",
        "--enable-prefix-caching",
        "--max-num-batched-tokens",
        "2048",
    ]
    throughput = EngineSpec.from_profile("throughput", model="/m")
    assert (
        throughput.quantization == "fp8" and throughput.enable_prefix_caching and not throughput.max_num_batched_tokens
    )
    # A compressed-tensors (W8A8, W4A16...) folder keeps its own scheme: no --quantization fp8 on top of it.
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
    quantized = EngineSpec.from_profile("throughput", model=str(tmp_path))
    assert quantized.quantization is None and quantized.enable_prefix_caching
    assert EngineSpec.from_profile("throughput", model=str(tmp_path), quantization="fp8").quantization == "fp8"
    cpu_quantized = EngineSpec.from_profile("cpu", model=str(tmp_path))  # its own dtype, not the profile's float32
    assert cpu_quantized.dtype is None and EngineSpec.from_profile("cpu", model="/m").dtype == "float32"


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="default, cpu, throughput, latency"):
        EngineSpec.from_profile("turbo", model="/m")


FAKE_ENGINE = [sys.executable, "-m", "shipyard.testing.fake_openai"]


def test_process_starts_serves_and_stops(tmp_path: Path) -> None:
    spec = EngineSpec(model="/models/tiny", served_model_name="tiny")
    with EngineProcess(spec, tmp_path / "engine.log", command=FAKE_ENGINE) as engine:
        engine.wait_ready(timeout=30)
        assert engine.health()
        models = httpx.get(f"{engine.url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny"]
        pid = engine.pid
    assert not engine.alive() and pid is not None
    assert (tmp_path / "engine.log").read_text().startswith("$ ")


def test_process_that_dies_reports_its_last_error_quickly(tmp_path: Path) -> None:
    crash = [
        sys.executable,
        "-c",
        "import sys; print('INFO loading'); print('ValueError: no space for the KV cache'); sys.exit(3)",
    ]
    engine = EngineProcess(EngineSpec(model="/m"), tmp_path / "engine.log", command=crash)
    engine.start()
    with pytest.raises(EngineStartError, match="code 3.*no space for the KV cache"):
        engine.wait_ready(timeout=30)
    engine.stop()


def test_process_that_never_gets_healthy_times_out(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    engine = EngineProcess(EngineSpec(model="/m"), tmp_path / "engine.log", command=sleeper)
    engine.start()
    try:
        with pytest.raises(EngineStartError, match="not healthy after"):
            engine.wait_ready(timeout=1)
    finally:
        engine.stop(grace_s=1)
    assert not engine.alive()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ar' + 'med', flush=True);"
        "time.sleep(60)",
    ]
    engine = EngineProcess(EngineSpec(model="/m"), tmp_path / "engine.log", command=stubborn)
    engine.start()
    assert wait_for(lambda: "armed" in (tmp_path / "engine.log").read_text(), timeout=10)
    assert engine.stop(grace_s=0.5) == -9


def test_last_error_prefers_error_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("INFO a\nTraceback (most recent call last):\nRuntimeError: boom\nINFO shutting down\n")
    assert last_error(log) == "RuntimeError: boom"
    assert last_error(tmp_path / "missing") == ""


def test_engine_is_pinned_to_the_cores_it_binds(tmp_path: Path) -> None:
    from shipyard.engine.process import parse_cpu_list

    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5} and parse_cpu_list("auto") is None
    engine = EngineProcess(
        EngineSpec(model="/m"), tmp_path / "log", command=FAKE_ENGINE, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}
    )
    with engine:
        engine.wait_ready(timeout=30)
        assert engine.pid is not None and os.sched_getaffinity(engine.pid) == {0}


def test_parallelism_flags_for_several_gpus() -> None:
    args = EngineSpec(model="/m", tensor_parallel_size=2, data_parallel_size=2).vllm_args(8000)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--data-parallel-size") + 1] == "2"
    assert load_settings(engine={"data_parallel_size": 2}).engine.data_parallel_size == 2


def test_a_request_without_max_tokens_is_capped_by_the_models_default() -> None:
    """Issue 34 item 12: without max_tokens vLLM generates to the context length (minutes on a busy engine, then a
    gateway timeout); every engine shipyard starts caps it with the model's default_max_tokens."""
    from shipyard.settings import load_settings
    from shipyard.stack import engine_spec

    settings = load_settings(api_keys="sk-x")
    args = engine_spec(settings, "/models/m", "m", "cpu", False).vllm_args(8000)
    flag = args.index("--override-generation-config")
    assert (
        json.loads(args[flag + 1]) == {"max_new_tokens": settings.engine.default_max_tokens} == {"max_new_tokens": 1024}
    )
    off = load_settings(api_keys="sk-x", engine={"default_max_tokens": None})
    assert "--override-generation-config" not in engine_spec(off, "/models/m", "m", "cpu", False).vllm_args(8000)
