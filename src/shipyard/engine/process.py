"""One vLLM OpenAI server as a child process: start, wait until healthy, stop; its log goes to a file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from shipyard.engine.guard import GUARD
from shipyard.engine.spec import EngineSpec

_PR_SET_PDEATHSIG = 1

NOT_INHERITED = frozenset({"PROMETHEUS_MULTIPROC_DIR"})
"""The gateway's own settings that must not reach vLLM: a gateway of several processes counts its metrics in
prometheus_client's multiprocess folder, and vLLM, which uses the same library, would write its own there."""
ENGINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_MAX_STOP_STRINGS": "64",
    "VLLM_SERVER_DEV_MODE": "1",
}
"""Environment of every engine shipyard starts. vLLM accepts 4 stop strings per request by default;
/v1/intent's shortest decode sends one per label, and a label set has at most 64 (the deploy images set the
same). Dev mode turns on the routes an in-place update drives (``/pause``, ``/collective_rpc``,
``/reset_prefix_cache``, ``/resume``): shipyard's engines listen on loopback only, and the gateway forwards
none of those routes."""
_ERROR_MARKERS = (
    "Error",
    "error:",
    "Traceback",
    "RuntimeError",
    "ValueError",
    "Exception",
    "CUDA out of memory",
)


def _secret_or_ours(name: str) -> bool:
    """Not for an engine: shipyard's own settings (its API, admin and engine keys, a state URL with a Redis
    password: all ``SHIPYARD_*``; the engine gets its own key as ``VLLM_API_KEY``) and :data:`NOT_INHERITED`."""
    return name in NOT_INHERITED or name.upper().startswith("SHIPYARD_") or name == "VLLM_API_KEY"


MARKER_ENV = "SHIPYARD_ENGINE_OF"
"""Set in every engine's environment to the data dir of the shipyard that started it: `shipyard stop` finds
them by it, also engines whose gateway crashed."""


class EngineStartError(RuntimeError):
    """The engine exited or stayed unhealthy while starting; the message carries the log's last error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def last_error(log_file: Path, max_lines: int = 400) -> str:
    """The last line of a log that looks like an error (or its last line), for a one-line failure report."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-max_lines:]
    except OSError:
        return ""
    for line in reversed(lines):
        if any(marker in line for marker in _ERROR_MARKERS) and "Traceback" not in line:
            return line.strip()
    return lines[-1].strip() if lines else ""


def set_parent_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If shipyard is killed outright, the kernel sends the engine SIGTERM: no orphan holding the GPU.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def parse_cpu_list(text: str) -> set[int] | None:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; None for vLLM's symbolic values (``auto``, ``nobind``) or anything else."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        return None
    return cpus or None


def _child_setup(cpus: set[int] | None, die_with_parent: bool) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        if die_with_parent:
            set_parent_death_signal()
        if cpus:
            # The whole engine (API server, engine core, workers) stays on its cores, so a second engine
            # starting beside it is not starved by the first one's busy loops.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return setup


class EngineProcess:
    """A ``vllm`` OpenAI server for one :class:`EngineSpec`.

    >>> with EngineProcess(spec, log_file=Path("engine.log")) as engine:   # doctest: +SKIP
    ...     engine.wait_ready(timeout=300)
    ...     print(engine.url)          # http://127.0.0.1:38211

    ``die_with_parent``: the kernel stops the engine when the process that started it dies (tests, one-off
    runs). The serving stack turns it off: its engines outlive a crashed gateway, which adopts them again
    (:meth:`adopt`) when it restarts.
    """

    def __init__(
        self,
        spec: EngineSpec,
        log_file: Path,
        *,
        port: int | None = None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.spec = spec
        self.log_file = log_file
        self.port = port or free_port(spec.host)
        self.command = list(command) if command else [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        self.env = env
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: psutil.Process | None = None

    @classmethod
    def adopt(
        cls,
        spec: EngineSpec,
        log_file: Path,
        *,
        port: int,
        pid: int,
        started_at: float | None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        marker: str | None = None,
    ) -> EngineProcess:
        """The engine already running as ``pid`` (started by an earlier gateway); ProcessLookupError when that
        process is gone, is another one that reuses the pid (its start time differs from ``started_at``, or no
        start time was recorded), or was not started by this shipyard (``marker`` is not in its environment):
        a pid read from the state is never signalled on its word alone."""
        engine = cls(spec, log_file, port=port, command=command, env=env, die_with_parent=False)
        if started_at is None:
            raise ProcessLookupError(f"no start time recorded for pid {pid}: not adopted")
        try:
            process = psutil.Process(pid)
            created = process.create_time()
            running = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            ours = marker is None or process.environ().get(MARKER_ENV) == marker
        except psutil.Error:
            raise ProcessLookupError(f"engine pid {pid} is gone (or not ours to inspect)") from None
        if not running or abs(created - started_at) > 2.0:
            raise ProcessLookupError(f"pid {pid} is no longer the engine started at {started_at}")
        if not ours:
            raise ProcessLookupError(f"pid {pid} was not started by the shipyard of {marker}: not adopted")
        engine._adopted = process
        return engine

    @property
    def started_at(self) -> float | None:
        """The process's start time (epoch seconds), which with the pid identifies it across restarts."""
        pid = self.pid
        if pid is None:
            return None
        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    @property
    def cpus(self) -> set[int] | None:
        """The cores this engine is pinned to: those of ``VLLM_CPU_OMP_THREADS_BIND`` when it names cores."""
        bind = (self.env or {}).get("VLLM_CPU_OMP_THREADS_BIND")
        return parse_cpu_list(bind) if bind else None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._adopted.pid if self._adopted is not None else None

    def argv(self) -> list[str]:
        """The engine's command line; with a key, every route but ``/health`` asks for it (``engine.guard``)."""
        guard = ["--middleware", GUARD] if (self.env or {}).get("VLLM_API_KEY") else []
        return [*self.command, *self.spec.vllm_args(self.port), *guard]

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"engine already running (pid {self.pid})")
        self._adopted = None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not _secret_or_ours(k)}
        env.update({**ENGINE_ENV, **(self.env or {})})
        with open(self.log_file, "ab") as log:
            log.write(f"$ {' '.join(self.argv())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: stop() reaches vLLM's engine-core children too
                preexec_fn=_child_setup(self.cpus, self.die_with_parent) if sys.platform == "linux" else None,
            )

    def alive(self) -> bool:
        if self._adopted is not None:
            try:
                return self._adopted.is_running() and self._adopted.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        return self._proc is not None and self._proc.poll() is None

    def health(self, timeout: float = 2.0) -> bool:
        if not self.alive():
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 600.0, poll_s: float = 0.5) -> None:
        """Block until ``/health`` answers 200; raise :class:`EngineStartError` as soon as the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self._proc.returncode if self._proc else None
                raise EngineStartError(
                    f"vLLM exited with code {code} while starting: {last_error(self.log_file)} "
                    f"(full log: {self.log_file})"
                )
            if self.health(timeout=min(2.0, poll_s * 4)):
                return
            time.sleep(poll_s)
        raise EngineStartError(
            f"vLLM not healthy after {timeout:.0f}s: {last_error(self.log_file)} (full log: {self.log_file})"
        )

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``grace_s``. Returns the exit code."""
        if self._adopted is not None:
            return self._stop_adopted(self._adopted, grace_s)
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children of the group (engine core, workers) may outlive the leader briefly.
        self._signal_group(proc.pid, signal.SIGKILL)
        return proc.returncode

    def _stop_adopted(self, process: psutil.Process, grace_s: float) -> int | None:
        self._signal_group(process.pid, signal.SIGTERM)
        code: int | None = None
        try:
            code = process.wait(timeout=grace_s)
        except psutil.TimeoutExpired:
            self._signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                code = process.wait(timeout=10)
        except psutil.Error:
            pass
        self._signal_group(process.pid, signal.SIGKILL)
        return code

    def kill(self) -> None:
        """Hard-kill the server process only (as a crash would), leaving its group to fend for itself."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def __enter__(self) -> EngineProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_until_ready(
    proc: subprocess.Popen[bytes], url: str, timeout_s: float, log_hint: str, poll_s: float = 1.0
) -> None:
    """Wait for a ``shipyard serve`` started as a subprocess (by benchmarks, the quantize search, harnesses):
    poll ``url``/ready every ``poll_s`` until it answers 200; RuntimeError (naming ``log_hint``) if the process
    exits first or ``timeout_s`` passes. A refused or dropped connection is simply "not yet"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shipyard serve exited {proc.returncode}; see {log_hint}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"shipyard serve at {url} not ready after {timeout_s:.0f} s; see {log_hint}")
