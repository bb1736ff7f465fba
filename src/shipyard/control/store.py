"""Where the deployment state lives: a file under ``data_dir`` (one gateway) or Redis (several gateways).

Every store keeps the last few states, refuses a save that does not follow the stored revision (two writers
never interleave silently), and offers what several gateways need to cooperate: a rollout **lease** (one
rollout at a time, with a TTL the owner renews) and **load reports** (each gateway's in-flight requests per
replica, so a drain waits for requests on every gateway, not only on the one running the rollout).

>>> store = open_store(None, Path("~/.cache/shipyard"))        # doctest: +SKIP
>>> state = await store.load()                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.control.state import DeploymentState, StateError

log = logging.getLogger("shipyard.control")

KEEP = 5
"""States kept: the current one and the four before it."""
KEPT_RESPONSES = 100_000
"""Response ids a store kept in memory remembers (the oldest are forgotten first)."""


class StateUnreadable(RuntimeError):
    """The stored state cannot be read; the message names it and the last good copy (for people)."""


class StateConflict(RuntimeError):
    """Another writer saved a newer state first; nothing was written."""


class StateSaveFailed(RuntimeError):
    """The store could not write (a full or read-only disk, an unreachable Redis); the stored state is unchanged."""


class LeaseLost(StateConflict):
    """A save fenced by a lease this writer no longer holds (it expired, another gateway took it): refused."""


@dataclass(frozen=True)
class Fence:
    """The lease a save is made under: its owner and the token the store gave when the lease was taken.

    Tokens only grow: a writer that lost its lease (and may not know it yet) carries an older token than the
    gateway that took over, and the store refuses its saves (Kleppmann's fencing token; etcd's lease revision)."""

    owner: str
    token: int

    def lost(self) -> LeaseLost:
        return LeaseLost(f"{self.owner} no longer holds the rollout lease (token {self.token}); not saved")


class StoreLocked(RuntimeError):
    """Another gateway already uses this file store (a file store serves one gateway; use Redis for more)."""


@dataclass(frozen=True)
class LoadReport:
    """What one gateway reported: the state revision it applied and its requests in flight per replica."""

    gateway: str
    revision: int
    in_flight: Mapping[str, int]
    at: float


class StateStore(ABC):
    """Load, save and watch one :class:`DeploymentState`; lease the right to run a rollout."""

    description = "state"

    @abstractmethod
    async def load(self) -> DeploymentState | None:
        """The current state, None when none was ever saved; :class:`StateUnreadable` when it cannot be read."""

    @abstractmethod
    async def save(self, state: DeploymentState, fence: Fence | None = None) -> None:
        """Store ``state`` if it follows the stored revision, else raise :class:`StateConflict`; with ``fence``,
        only while that very lease (owner and token) is held, else raise :class:`LeaseLost`."""

    @abstractmethod
    async def acquire_lease(self, owner: str, ttl_s: float) -> int | None:
        """Take (or renew, when ``owner`` holds it) the rollout lease: its fencing token (the same while it is
        renewed, a larger one each time it is taken anew); None when another owner holds it."""

    @abstractmethod
    async def release_lease(self, owner: str) -> None: ...

    @abstractmethod
    async def lease_owner(self) -> str | None: ...

    @abstractmethod
    async def report_load(self, report: LoadReport, ttl_s: float) -> None: ...

    @abstractmethod
    async def load_reports(self) -> list[LoadReport]:
        """Reports of every gateway that reported within its TTL."""

    @abstractmethod
    async def remember_response(self, response_id: str, replica: str, key: str, ttl_s: float) -> None:
        """Note which replica holds a stored Responses API response, and the key name that made it."""

    @abstractmethod
    async def response_of(self, response_id: str) -> tuple[str, str] | None:
        """(replica, key name) of a response one of the gateways sharing this store answered; None if unknown."""

    async def watch(self, interval_s: float = 0.2) -> AsyncIterator[DeploymentState]:
        """Each state newer than the last one seen (polled every ``interval_s``; a read error is skipped)."""
        seen = -1
        while True:
            with contextlib.suppress(StateUnreadable, OSError, ConnectionError):
                state = await self.load()
                if state is not None and state.revision > seen:
                    seen = state.revision
                    yield state
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        return None


class MemoryStateStore(StateStore):
    """A state in this process only (library use and tests); gone with the process."""

    description = "memory"

    def __init__(self) -> None:
        self._state: DeploymentState | None = None
        self._lease: tuple[str, float, int] | None = None
        self._tokens = 0
        self._reports: dict[str, tuple[LoadReport, float]] = {}
        self._responses: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    async def load(self) -> DeploymentState | None:
        return self._state

    async def save(self, state: DeploymentState, fence: Fence | None = None) -> None:
        self._check_fence(fence)
        _check_follows(self._state, state)
        self._state = state

    def _check_fence(self, fence: Fence | None) -> None:
        if fence is None:
            return
        lease = self._lease
        if lease is None or lease[1] <= time.monotonic() or (lease[0], lease[2]) != (fence.owner, fence.token):
            raise fence.lost()

    async def acquire_lease(self, owner: str, ttl_s: float) -> int | None:
        now = time.monotonic()
        if self._lease is not None and self._lease[1] > now:
            if self._lease[0] != owner:
                return None
            token = self._lease[2]
        else:
            self._tokens += 1
            token = self._tokens
        self._lease = (owner, now + ttl_s, token)
        return token

    async def release_lease(self, owner: str) -> None:
        if self._lease is not None and self._lease[0] == owner:
            self._lease = None

    async def lease_owner(self) -> str | None:
        if self._lease is None or self._lease[1] <= time.monotonic():
            return None
        return self._lease[0]

    async def report_load(self, report: LoadReport, ttl_s: float) -> None:
        self._reports[report.gateway] = (report, time.monotonic() + ttl_s)

    async def remember_response(self, response_id: str, replica: str, key: str, ttl_s: float) -> None:
        self._responses[response_id] = (replica, key, time.monotonic() + ttl_s)
        while len(self._responses) > KEPT_RESPONSES:
            self._responses.popitem(last=False)

    async def response_of(self, response_id: str) -> tuple[str, str] | None:
        found = self._responses.get(response_id)
        if found is None or found[2] < time.monotonic():
            return None
        return found[0], found[1]

    async def load_reports(self) -> list[LoadReport]:
        now = time.monotonic()
        return [report for report, until in self._reports.values() if until > now]


def _check_follows(stored: DeploymentState | None, state: DeploymentState) -> None:
    current = stored.revision if stored is not None else 0
    if state.revision != current + 1:
        raise StateConflict(f"state revision {state.revision} does not follow the stored revision {current}")


class FileStateStore(MemoryStateStore):
    """``DIR/state.json``, written as the registry writes manifests (temp file, fsync, rename, fsync the folder),
    with the previous states beside it as ``state.json.1`` … ``.4``.

    One gateway per file: opening takes an exclusive lock (``DIR/gateway.lock``) that the kernel drops when the
    process dies, so a crashed gateway never blocks its own restart. The lease and the lock holder's own load
    report stay in its process; the serving workers of a gateway of several processes (which read the state
    without the lock and never save) report theirs as files (``DIR/loads/GATEWAY.json``, each with its expiry), so
    they count in the primary's drains and holds.
    """

    description = "file"

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.path = folder / "state.json"
        self.description = f"file {self.path}"
        self._lock: int | None = None
        self._parsed: tuple[int, int, int] | None = None
        """(inode, mtime, size) of the file ``_state`` was read from or written to."""
        self._reported: set[Path] = set()

    def lock(self) -> None:
        """Take the one-gateway lock; :class:`StoreLocked` names the process holding it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "gateway.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(
                f"another gateway (pid {holder}) uses the state in {self.folder}; a file state serves one gateway "
                "(stop it, give this one another data_dir, or point both at Redis with state_url)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd

    async def load(self) -> DeploymentState | None:
        """The state in the file; parsed again only when the file changed (``watch`` polls this)."""
        try:
            seen = _file_identity(self.path)
            if self._state is not None and seen == self._parsed:
                return self._state
            text = self.path.read_bytes()
        except FileNotFoundError:
            if self._last_good() is not None:  # copies without the live file: someone removed it, never a save
                raise StateUnreadable(self._unreadable("is missing although earlier copies are beside it")) from None
            return None
        except OSError as exc:
            raise StateUnreadable(self._unreadable(f"cannot be read ({exc})")) from None
        try:
            state = DeploymentState.from_json(text)
        except StateError as exc:
            raise StateUnreadable(self._unreadable(str(exc))) from None
        self._state, self._parsed = state, seen
        return state

    def _unreadable(self, why: str) -> str:
        good = self._last_good()
        where = (
            f"the last good copy is {good[0]} (revision {good[1].revision}); check it and copy it over the state "
            "file to go on from there"
            if good
            else f"no earlier copy is readable; remove {self.path} to start again from the configuration"
        )
        return f"state file {self.path} {why}: {where}"

    def _last_good(self) -> tuple[Path, DeploymentState] | None:
        for i in range(1, KEEP):
            older = self.path.with_name(f"{self.path.name}.{i}")
            with contextlib.suppress(OSError, StateError):
                return older, DeploymentState.from_json(older.read_bytes())
        return None

    async def save(self, state: DeploymentState, fence: Fence | None = None) -> None:
        """Write, sync, then move: ``state.json`` exists at every instant once a state was saved.

        The new state goes to a temp file (fsync), the copies shift (``.3`` → ``.4`` …), the live file is *linked*
        as ``.1`` (it stays in place), and the temp file is renamed over it (then the folder is synced). A crash
        anywhere leaves the old state or the new one live; a failed write (a full or read-only filesystem) leaves
        everything as it was, no temp file included, and raises :class:`StateSaveFailed`."""
        self._check_fence(fence)
        _check_follows(self._state, state)
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(staged, "w") as handle:
                handle.write(state.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            if self.path.exists():
                for i in range(KEEP - 1, 1, -1):
                    newer = self.path.with_name(f"{self.path.name}.{i - 1}")
                    if newer.exists():
                        os.replace(newer, self.path.with_name(f"{self.path.name}.{i}"))
                first = self.path.with_name(f"{self.path.name}.1")
                with contextlib.suppress(FileNotFoundError):
                    first.unlink()
                os.link(self.path, first)
            os.replace(staged, self.path)
            _fsync_folder(self.folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise StateSaveFailed(
                f"the state could not be saved to {self.path} ({exc.strerror or exc}); nothing was changed: "
                "free space or fix the permissions of that folder, then try again"
            ) from exc
        self._state, self._parsed = state, _file_identity(self.path)

    async def remember_response(self, response_id: str, replica: str, key: str, ttl_s: float) -> None:
        """A file per response under ``DIR/responses`` (the serving workers of this gateway read them too)."""
        record = {"replica": replica, "key": key, "until": time.time() + ttl_s}
        replace_with(self.folder / "responses" / _response_file(response_id), json.dumps(record))

    async def response_of(self, response_id: str) -> tuple[str, str] | None:
        try:
            record = json.loads((self.folder / "responses" / _response_file(response_id)).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("until", 0) < time.time():
            return None
        return str(record["replica"]), str(record["key"])

    async def report_load(self, report: LoadReport, ttl_s: float) -> None:
        if self._lock is not None:  # the gateway holding the lock reads the others' reports; its own stays here
            await super().report_load(report, ttl_s)
            return
        path = self.folder / "loads" / f"{_file_name(report.gateway)}.json"
        record = {**dataclasses.asdict(report), "in_flight": dict(report.in_flight), "until": time.time() + ttl_s}
        replace_with(path, json.dumps(record))
        self._reported.add(path)

    async def load_reports(self) -> list[LoadReport]:
        reports, now = await super().load_reports(), time.time()
        for path in (self.folder / "loads").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record = json.loads(path.read_bytes())
                if record.pop("until") > now:
                    reports.append(LoadReport(**record))
        return reports

    async def close(self) -> None:
        for path in self._reported:
            with contextlib.suppress(OSError):
                path.unlink()
        self._reported.clear()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def replace_with(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of it (a temp file renamed over it; the temp
    file is removed when the write fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staged.write_text(text)
        os.replace(staged, path)
    except OSError:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise


def _ms(seconds: float) -> int:
    """A TTL in Redis' milliseconds (at least 1)."""
    return max(int(seconds * 1000), 1)


def _response_file(response_id: str) -> str:
    return hashlib.sha256(response_id.encode()).hexdigest()[:40] + ".json"


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def _fsync_folder(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _file_name(gateway: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in gateway).lstrip(".") or "gateway"


def _file_identity(path: Path) -> tuple[int, int, int]:
    """Changes whenever the file is replaced (a new inode) or edited in place (mtime, size)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


_RENEW = """
local held = redis.call('get', KEYS[1])
if held then
  local owner, token = string.match(held, '^(.*)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""
_RELEASE = """
local held = redis.call('get', KEYS[1])
if held and string.match(held, '^(.*)|%d+$') == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_SAVE = """
if ARGV[4] ~= '' and redis.call('get', KEYS[3]) ~= ARGV[4] then return -2 end
local stored = tonumber(redis.call('hget', KEYS[1], 'revision') or '0')
if stored + 1 ~= tonumber(ARGV[1]) then return stored end
redis.call('hset', KEYS[1], 'revision', ARGV[1], 'state', ARGV[2], 'signature', ARGV[5])
redis.call('lpush', KEYS[2], ARGV[2])
redis.call('ltrim', KEYS[2], 0, tonumber(ARGV[3]) - 2)
return -1
"""


class RedisStateStore(StateStore):
    """The state in Redis, shared by every gateway pointed at the same ``redis://`` URL and ``prefix``.

    Keys: ``PREFIX:state`` (a hash: revision + JSON, written by one Lua script so a save is atomic and checked
    against the stored revision), ``PREFIX:previous`` (the last states before it), ``PREFIX:lease`` (the
    rollout lease, with a TTL), ``PREFIX:load:GATEWAY`` (load reports, with a TTL).
    """

    def __init__(
        self, url: str, prefix: str = "shipyard", local_copy: Path | None = None, signing_key: str | None = None
    ) -> None:
        self.signing_key = signing_key.encode() if signing_key else None
        """With a key, every state saved carries an HMAC of it and a state without a valid one is refused: what
        Redis holds chooses where prompts go and which processes are signalled, so only the gateways (which
        share the key) may write it, not whoever can reach Redis."""
        self.url = url
        self.prefix = prefix
        self.description = f"redis {_redact(url)} (prefix {prefix})"
        self.redis = redis_client(url, timeout_s=5.0)
        self.local_copy = local_copy
        """The last state read from Redis, kept on this host: what a gateway serves when it starts while Redis
        is unreachable (instead of crash-looping), until Redis answers again."""
        self.degraded: str | None = None
        """Why the state served is the local copy (None while Redis answers)."""
        self._copied = -1

    async def load(self) -> DeploymentState | None:
        try:
            raw, signature = await self.redis.hmget(f"{self.prefix}:state", ["state", "signature"])
        except Exception as exc:
            import redis

            if not isinstance(exc, (OSError, redis.ConnectionError, redis.TimeoutError)):
                raise
            return self._local(exc)
        if raw is None:
            return None
        given = signature.decode() if isinstance(signature, bytes) else str(signature or "")
        if self.signing_key is not None and not hmac.compare_digest(self._sign(_bytes(raw)), given):
            raise StateUnreadable(
                f"the state in {self.description} is not signed with this deployment's state_key: refused (it was "
                "written by something other than a gateway of this deployment, or the gateways' state_key differ)"
            )
        try:
            state = DeploymentState.from_json(raw)
        except StateError as exc:
            raise StateUnreadable(
                f"the state in {self.description} {exc}: the last good copies are in the list "
                f"{self.prefix}:previous (LINDEX {self.prefix}:previous 1)"
            ) from None
        self.degraded = None
        self._keep_local(state)
        return state

    def _local(self, exc: Exception) -> DeploymentState | None:
        """The local copy while Redis cannot be reached; the error itself when there is none."""
        copy = None
        if self.local_copy is not None:
            with contextlib.suppress(OSError, StateError):
                copy = DeploymentState.from_json(self.local_copy.read_bytes())
        if copy is None:
            raise exc
        if self.degraded is None:
            log.warning(
                "%s unreachable (%s); serving the last state read from it (revision %d, kept in %s)",
                self.description,
                exc,
                copy.revision,
                self.local_copy,
            )
        self.degraded = (
            f"{self.description} unreachable ({type(exc).__name__}); serving the last state read from it "
            f"(revision {copy.revision}, kept in {self.local_copy}); rollouts wait until it answers"
        )
        return copy

    def _keep_local(self, state: DeploymentState) -> None:
        if self.local_copy is None or state.revision == self._copied:
            return
        with contextlib.suppress(OSError):
            replace_with(self.local_copy, state.to_json())
            self._copied = state.revision

    def _sign(self, raw: bytes) -> str:
        if self.signing_key is None:
            return ""
        return hmac.new(self.signing_key, raw, hashlib.sha256).hexdigest()

    async def save(self, state: DeploymentState, fence: Fence | None = None) -> None:
        text = state.to_json()
        result = await self.redis.eval(
            _SAVE,
            3,
            f"{self.prefix}:state",
            f"{self.prefix}:previous",
            f"{self.prefix}:lease",
            state.revision,
            text,
            KEEP,
            f"{fence.owner}|{fence.token}" if fence is not None else "",
            self._sign(text.encode()),
        )
        if int(result) == -2 and fence is not None:
            raise fence.lost()
        if int(result) != -1:
            raise StateConflict(f"state revision {state.revision} does not follow the stored revision {result}")

    async def acquire_lease(self, owner: str, ttl_s: float) -> int | None:
        token = int(await self.redis.eval(_RENEW, 2, f"{self.prefix}:lease", f"{self.prefix}:fence", owner, _ms(ttl_s)))
        return token or None

    async def release_lease(self, owner: str) -> None:
        await self.redis.eval(_RELEASE, 1, f"{self.prefix}:lease", owner)

    async def lease_owner(self) -> str | None:
        raw = await self.redis.get(f"{self.prefix}:lease")
        held = raw.decode() if isinstance(raw, bytes) else raw
        return held.rpartition("|")[0] if held else None

    async def remember_response(self, response_id: str, replica: str, key: str, ttl_s: float) -> None:
        await self.redis.set(f"{self.prefix}:response:{response_id}", json.dumps([replica, key]), px=_ms(ttl_s))

    async def response_of(self, response_id: str) -> tuple[str, str] | None:
        raw = await self.redis.get(f"{self.prefix}:response:{response_id}")
        if raw is None:
            return None
        replica, key = json.loads(raw)
        return str(replica), str(key)

    async def report_load(self, report: LoadReport, ttl_s: float) -> None:
        body = json.dumps({"revision": report.revision, "in_flight": dict(report.in_flight), "at": report.at})
        await self.redis.set(f"{self.prefix}:load:{report.gateway}", body, px=_ms(ttl_s))

    async def load_reports(self) -> list[LoadReport]:
        reports = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}:load:*"):
            raw = await self.redis.get(key)
            if raw is None:
                continue
            body: dict[str, Any] = json.loads(raw)
            gateway = (key.decode() if isinstance(key, bytes) else key).rpartition(":load:")[2]
            reports.append(LoadReport(gateway, int(body["revision"]), body["in_flight"], float(body["at"])))
        return reports

    async def close(self) -> None:
        await self.redis.aclose()


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if userinfo else url


def open_store(
    state_url: str | None, data_dir: Path, signing_key: str | None = None, model: str | None = None
) -> StateStore:
    """``None`` → the file ``data_dir/state/state.json``; ``file:///DIR`` → ``DIR/state.json``;
    ``redis://[:password@]host:port/db[?prefix=NAME]`` (or ``rediss://``) → Redis, its states signed with
    ``signing_key`` when one is given. ValueError otherwise.

    ``model``: the store of one model of a fleet (``models:``): the folder ``models/<model>`` under the file
    store's, or the Redis prefix ``NAME:model:<model>``; each has its own state, lease and load reports.
    """
    if state_url is None:
        return FileStateStore(_model_folder(data_dir / "state", model))
    if state_url.startswith("file://"):
        return FileStateStore(_model_folder(Path(state_url[len("file://") :]), model))
    if is_redis(state_url):
        url, prefix = redis_location(state_url)
        prefix += f":model:{model}" if model else ""
        return RedisStateStore(
            url,
            prefix=prefix,
            local_copy=data_dir / "state" / f"{prefix.replace('/', '_')}.redis.json",
            signing_key=signing_key,
        )
    raise ValueError(f"state_url {state_url!r} must be file:///DIR or redis://HOST:PORT/DB")


REDIS_CONNECTIONS = 256
"""Connections one process opens to Redis at most; past them a command waits for one to come free (up to its
timeout) — redis-py's default pool raises at its 100th instead, at random under load."""


def redis_client(url: str, timeout_s: float) -> Any:
    """An asyncio Redis client for ``url`` whose every wait (connect, answer, a free pooled connection) is
    bounded by ``timeout_s``."""
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return redis.asyncio.Redis.from_pool(pool)


def is_redis(state_url: str | None) -> bool:
    return bool(state_url and state_url.startswith(("redis://", "rediss://", "unix://")))


def redis_location(state_url: str) -> tuple[str, str]:
    """``redis://HOST:PORT/DB?prefix=NAME`` -> (the URL for the client, the key prefix; default ``shipyard``)."""
    base, _, query = state_url.partition("?")
    params = dict(part.partition("=")[::2] for part in query.split("&") if part)
    prefix = params.pop("prefix", "shipyard")
    rest = "&".join(f"{k}={v}" for k, v in params.items())
    return base + (f"?{rest}" if rest else ""), prefix


def _model_folder(folder: Path, model: str | None) -> Path:
    return folder / "models" / model.replace("/", "_") if model else folder
