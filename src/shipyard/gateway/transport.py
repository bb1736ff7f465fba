"""The gateway's upstream transport: httpx's API over aiohttp's connection handling (``httpx-aiohttp``).

httpcore's pure-Python HTTP/1.1 parser and the cancel scope it opens per read were most of the gateway's CPU per
streamed token (py-spy, benchmarks/README.md); aiohttp parses in C. httpx-aiohttp maps aiohttp's errors to
httpx's coarsely (a refused connection becomes ``ConnectTimeout``, a server that hung up becomes
``ConnectTimeout`` too), and the proxy's decisions hang on the kind: a refused or dropped connection means
"nothing answered, send it elsewhere and take the replica out now", a timeout means "busy". This module maps
them precisely.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

# Most specific first: the first entry that matches wins.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.HTTPError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (TimeoutError, httpx.ReadTimeout),
)


def _precise(exc: BaseException) -> httpx.HTTPError | None:
    origin = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
    for source, target in _ERRORS:
        if isinstance(origin, source):
            return target(str(origin) or type(origin).__name__)
    return None


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except (httpx.HTTPError, aiohttp.ClientError, TimeoutError) as exc:
        precise = _precise(exc)
        if precise is None:
            raise
        raise precise from exc


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self.inner:
                yield chunk

    async def aclose(self) -> None:
        with _mapped():
            await self.inner.aclose()


ANSWER = "shipyard.aiohttp_response"
"""Where an ``httpx.Response`` made by :meth:`UpstreamTransport.post` keeps aiohttp's own response."""


async def read_whole(response: httpx.Response) -> bytes:
    """A non-streamed answer's whole body: from aiohttp's response at once when the gateway's transport made it
    (httpx's ``aread`` walks its byte-stream iterators and an anyio scope per chunk: ~8% of the gateway's CPU for a
    one-token answer), else as httpx reads it. The same errors either way."""
    raw = response.extensions.get(ANSWER)
    if raw is None or "content-encoding" in response.headers:  # httpx decodes it; aiohttp was told not to
        return await response.aread()
    try:
        with _mapped():
            return bytes(await raw.read())
    except aiohttp.ClientError as exc:  # any other aiohttp error while reading: the read failed
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


async def iter_raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed answer's bytes as they arrive: from aiohttp's response directly when the gateway's transport
    made it (per chunk, httpx's iterators and anyio's backend lookups were a tenth of a relayed stream's CPU),
    else through httpx. The same errors either way."""
    raw = response.extensions.get(ANSWER)
    if raw is None:
        async for chunk in response.aiter_raw():
            yield chunk
        return
    try:
        with _mapped():
            async for chunk in raw.content.iter_any():
                yield chunk
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


def aiohttp_timeout(timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
    """httpx's timeouts as aiohttp's, mapped as ``AiohttpTransport`` maps them per request."""
    return aiohttp.ClientTimeout(sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool)


class UpstreamTransport(AiohttpTransport):
    """An ``AiohttpTransport`` on an uncapped connection pool whose errors are the httpx kinds they mean."""

    def __init__(self, keepalive_s: float) -> None:
        """``keepalive_s``: how long an idle connection is kept (``Settings.upstream_keepalive_s``)."""

        def session() -> aiohttp.ClientSession:  # made on first use, inside the serving event loop
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s))

        super().__init__(client=session)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> httpx.Response:
        """One POST straight to aiohttp, its answer's body left to stream: what ``AsyncClient.send`` of a built
        request does, without the layers the gateway never needs upstream (auth, redirects, cookies, event hooks,
        building and parsing an ``httpx.URL`` and ``Headers`` per request). A sixth of the gateway's CPU per short
        request went there (py-spy, issue 37)."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        with _mapped():
            response = await self.client.request(
                "POST",
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=timeout,
            ).__aenter__()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Stream(AiohttpResponseStream(response)),
            extensions={ANSWER: response},
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _mapped():
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Stream(response.stream)
        return response
