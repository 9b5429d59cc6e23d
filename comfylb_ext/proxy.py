"""A standing-by coordinator: every request and websocket passed to the leader, so a
client reaches the cluster through any coordinator and sees the same answers.

Requests keep their Host header (the leader checks Origin against it, as it would for the
client itself); hop-by-hop headers stay behind.  When the leader goes away its sockets
close here too; clients reconnect, and find this coordinator leading or passing them on to
the one that does.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .api.comfy import MAX_UPLOAD_SIZE
from .delivery import Send
from .edge import Bridged, Edge
from .errors import error, error_body

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "content-length"})
WS_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                        "sec-websocket-protocol"})
NOT_PASSED = HOP_BY_HOP | WS_HEADERS  # of a request: its websocket handshake is the stand-by's own
CLOSE_WITHIN = 2.0  # seconds a client may take to answer the close of its socket
NO_LEADER = ("No coordinator leads the cluster right now; one takes over within seconds. "
             "Try again shortly.")


def _end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """`headers` less `drop` and whatever its Connection header names (hop-by-hop too,
    RFC 9110 7.6.1); repeated ones (Set-Cookie) kept."""
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop and k.lower() not in named)


class Forwarder:
    """Passes requests and websockets on to the leader: the standalone stand-by's whole app
    (standby_app), and inside ComfyUI the stand-by's ComfyLB routes (hosts/comfyui.py)."""

    def __init__(self, leader: Callable[[], Awaitable[str | None]], edge: Edge | None = None) -> None:
        self.leader = leader   # the leading coordinator's URL, or None while there is none
        self.edge = edge       # relays its clients' progress and previews itself (edge.py)
        self.sockets: set[web.WebSocketResponse] = set()
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # every client's websocket is one connection to the leader, held for as long as it is open
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None))
        if self.edge is not None:
            await self.edge.start()

    async def close(self) -> None:
        """Clients' sockets close (they reconnect, to whoever leads now)."""
        await close_sockets(self.sockets, b"coordinator stopping")
        if self.edge is not None:
            await self.edge.close()
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        target = await self.leader()
        if target is None or self.session is None:
            return no_leader(request)
        # the path and query as the client sent them: decoded, "a%23b.png" would end at "a"
        url = URL(target.rstrip("/") + request.rel_url.raw_path_qs, encoded=True)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _bridge(request, self.session, url, self.sockets, self.edge)
        resp: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, headers=_end_to_end(request.headers, NOT_PASSED),
                                            data=request.content if request.body_exists else None,
                                            allow_redirects=False) as upstream:
                resp = web.StreamResponse(status=upstream.status, headers=_end_to_end(upstream.headers, HOP_BY_HOP))
                await resp.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError as e:
            log.warning("the leader at %s did not answer: %s", target, e)
            if resp is not None and resp.prepared:  # half an answer sent: the client must see it end
                if request.transport is not None:
                    request.transport.close()
                return resp
            return no_leader(request)


    async def ready(self, request: web.Request) -> web.Response:
        """Ready for an orchestrator once there is a leader to pass clients on to (no token
        needed, so nothing more: the leader's address stays inside)."""
        there = await self.leader() is not None
        return web.json_response({"ready": there, "role": "standby"}, status=200 if there else 503)


async def close_sockets(sockets: Iterable[web.WebSocketResponse], message: bytes) -> None:
    """Close clients' sockets at once, as a server going away does (ComfyUI's web UI then
    reconnects); one that never answers the close frame holds no one up past CLOSE_WITHIN."""
    closing = [asyncio.ensure_future(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=message))
               for ws in list(sockets)]
    if not closing:
        return
    _, late = await asyncio.wait(closing, timeout=CLOSE_WITHIN)
    for task in late:
        task.cancel()
    await asyncio.gather(*closing, return_exceptions=True)


def standby_app(leader: Callable[[], Awaitable[str | None]], edge: Edge | None = None) -> web.Application:
    """`leader()`: the leading coordinator's URL, or None while there is none."""
    app = web.Application(client_max_size=MAX_UPLOAD_SIZE)
    forwarder = Forwarder(leader, edge)

    async def start(app: web.Application) -> None:
        await forwarder.start()

    async def stop(app: web.Application) -> None:
        await forwarder.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.router.add_get("/lb/ready", forwarder.ready)
    app.router.add_route("*", "/{tail:.*}", forwarder.forward)
    return app


def no_leader(request: web.Request) -> web.Response:
    """503 in the shape the caller reads: ComfyLB's on /lb/*, ComfyUI's error dict elsewhere
    (its clients show error.message)."""
    if request.path.startswith(("/lb/", "/api/lb/")):
        body: dict = {"error": NO_LEADER}
    else:
        body = error_body(error("coordinator_unavailable", NO_LEADER, "no coordinator leads the cluster"))
    return web.json_response(body, status=503, headers={"Retry-After": "2"})


async def _bridge(request: web.Request, session: aiohttp.ClientSession, url: URL,
                  sockets: set[web.WebSocketResponse], edge: Edge | None) -> web.StreamResponse:
    """A client's websocket, joined to one on the leader until either closes."""
    try:
        upstream = await session.ws_connect(url.with_scheme("wss" if url.scheme == "https" else "ws"),
                                            headers=_end_to_end(request.headers, NOT_PASSED),
                                            max_msg_size=0, heartbeat=30.0)
    except aiohttp.WSServerHandshakeError as e:
        if e.status < 400:  # it answered, but not as a websocket server does
            log.warning("no websocket to the leader: %s", e)
            return no_leader(request)
        return web.Response(status=e.status, text=f"{e.status}: refused by the leading coordinator")  # a token, Origin
    except aiohttp.ClientError as e:
        log.warning("no websocket to the leader: %s", e)
        return no_leader(request)
    client = web.WebSocketResponse(max_msg_size=MAX_UPLOAD_SIZE, heartbeat=30.0)
    await client.prepare(request)
    sockets.add(client)
    bridged = Bridged(client) if edge is not None else None

    async def pump(src: Any, dst: Any, seen: Callable[[Bridged, str], Awaitable[Send | None]] | None) -> None:
        async for msg in src:  # either side: a server's or a client's websocket
            if msg.type == WSMsgType.TEXT:
                then = await seen(bridged, msg.data) if seen is not None and bridged is not None else None
                await dst.send_str(msg.data)
                if then is not None:
                    await then()
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
        await dst.close()

    try:
        legs = [asyncio.ensure_future(pump(client, upstream, edge.from_client if edge else None)),
                asyncio.ensure_future(pump(upstream, client, edge.from_leader if edge else None))]
        await asyncio.wait(legs, return_when=asyncio.FIRST_COMPLETED)
        for leg in legs:
            leg.cancel()
        await asyncio.gather(*legs, return_exceptions=True)
    finally:
        sockets.discard(client)
        if edge is not None and bridged is not None:
            await edge.closed(bridged)
        await upstream.close()
        await client.close()
    return client
