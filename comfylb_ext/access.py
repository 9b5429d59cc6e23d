"""Who may do what: the Origin rule, the tokens, the panel's session cookie, the exposure
rule, and the headers that keep a served file from running as a page of this origin.

Both hosts and the `/lb/*` API decide with these, so the rules are the same everywhere.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, Mapping
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from .config import Config

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_COOKIE = "comfylb_session"
SESSION_MAX_AGE = 30 * 24 * 3600
ORIGIN_REFUSED = ("cross-site request refused: its Origin is not this server's; "
                  "list the origin under server.allowed_origins to allow it")


# -- tokens ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    value: str = ""
    source: str = ""  # where it was set ("auth.token", "COMFYLB_TOKEN", …), for the log

    def __bool__(self) -> bool:
        return bool(self.value)


def configured_tokens(cfg: Config) -> tuple[Token, Token]:
    """(the /lb/* token, the client API token).  auth.token guards /lb/* when set, else
    auth.api_token does: a configured token never leaves /lb/* open."""
    def pick(value: str, name: str, env: str) -> Token:
        if value:
            return Token(value, name)
        return Token(os.environ[env], env) if os.environ.get(env) else Token()
    api = pick(cfg.auth.api_token, "auth.api_token", "COMFYLB_API_TOKEN")
    return pick(cfg.auth.token, "auth.token", "COMFYLB_TOKEN") or api, api


def bearer(request: web.Request) -> str | None:
    """The token of a well-formed `Authorization: Bearer <token>`, else None."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def matches(given: str | None, token: Token | str) -> bool:
    """Constant time, and never raises: any given value (non-ASCII, undecodable bytes
    aiohttp kept as surrogates, garbage) is simply not the token."""
    expected = token.value if isinstance(token, Token) else token
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def session_value(token: Token) -> str:
    """The panel's cookie: derived from the token, so the token itself is never stored in
    the browser, and a changed token ends every session."""
    key = token.value.encode("utf-8", "surrogatepass")
    return hmac.new(key, b"comfylb panel session", hashlib.sha256).hexdigest()


def session_cookies(value: str, paths: tuple[str, ...], secure: bool) -> list[str]:
    """Set-Cookie values, one per path (a cookie has one Path): HttpOnly, so no script
    reads it; SameSite=Strict, so no other site's request carries it."""
    out = []
    for path in paths:
        jar: SimpleCookie = SimpleCookie()
        jar[SESSION_COOKIE] = value
        m = jar[SESSION_COOKIE]
        m["path"], m["httponly"], m["samesite"] = path, True, "Strict"
        m["max-age"] = SESSION_MAX_AGE if value else 0
        if secure:
            m["secure"] = True
        out.append(m.OutputString())
    return out


# -- where it listens ----------------------------------------------------------------------
def is_loopback_host(host: str) -> bool:
    """A bind address or host name that only this machine reaches ("" binds everything)."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {a[4][0] for a in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


def listens_beyond_loopback(listen: str) -> bool:
    """ComfyUI's --listen value: a comma-separated list of addresses."""
    return any(not is_loopback_host(h) for h in listen.split(","))


def is_loopback_client(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def exposure_problem(cfg: Config) -> str | None:
    """Why the standalone balancer must not start as configured, in one line, or None."""
    host = cfg.server.host
    if is_loopback_host(host) or cfg.auth.allow_open or any(configured_tokens(cfg)):
        return None
    where = f" in {cfg.source}" if cfg.source else ""
    return (f"refusing to listen on {host or 'every address'} without a token (anyone who can reach it could run "
            f"prompts and add peers): set auth.api_token{where} or COMFYLB_API_TOKEN (guards ComfyUI's API and /lb/*), "
            f"or listen on 127.0.0.1, or set auth.allow_open: true to run it open")


# -- requests --------------------------------------------------------------------------------
def changes_state(request: web.Request) -> bool:
    """What a page on another site must not make a browser send: anything but a read,
    and the websocket upgrade (a socket that may send commands and receives events)."""
    return request.method not in SAFE_METHODS or request.headers.get("Upgrade", "").lower() == "websocket"


def same_origin(request: web.Request, allowed: frozenset[str]) -> bool:
    """No Origin (scripts, curl), an Origin naming the Host the request was sent to, or
    one listed in the config."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed or "*" in allowed:
        return True
    try:
        o = urlsplit(origin)
        h = urlsplit("//" + request.headers.get("Host", "").strip().lower())
        if o.scheme not in ("http", "https") or not o.hostname or not h.hostname:
            return False
        default = 443 if o.scheme == "https" else 80
        return (o.hostname, o.port or default) == (h.hostname, h.port or default)
    except ValueError:  # a port that is not a number, …
        return False


def without_token(request: web.Request) -> str:
    """The query string to pass on to a peer: `token` (a client's credential for this
    balancer) never lands in a peer's access log."""
    q = request.rel_url.query
    return request.rel_url.raw_query_string if "token" not in q else urlencode([(k, v) for k, v in q.items() if k != "token"])


@dataclass(frozen=True)
class Access:
    lb_token: Token = Token()
    api_token: Token = Token()          # standalone: guards ComfyUI's client API and /ws
    origins: frozenset[str] = frozenset()      # allowed besides the request's own (server.allowed_origins)
    api_origins: frozenset[str] = frozenset()  # also allowed on ComfyUI's API (ComfyUI's --enable-cors-header)
    loopback_only: bool = False         # extension: /lb/* with no token while ComfyUI listens beyond loopback
    cookie_paths: tuple[str, ...] = ("/lb", "/api/lb")
    config: str | None = None           # where a token would be set, for messages

    @classmethod
    def of(cls, cfg: Config, **kw: Any) -> "Access":
        lb, api = configured_tokens(cfg)
        return cls(lb_token=lb, api_token=api, origins=frozenset(cfg.server.allowed_origins), config=cfg.source, **kw)

    def origin_ok(self, request: web.Request, api: bool = False) -> bool:
        """`api`: a route of ComfyUI's API, where ComfyUI's own CORS origin counts too."""
        allowed = self.origins | self.api_origins if api else self.origins
        return not changes_state(request) or same_origin(request, allowed)

    def has_session(self, request: web.Request) -> bool:
        return bool(self.lb_token) and matches(request.cookies.get(SESSION_COOKIE), session_value(self.lb_token))

    def lb_refusal(self, request: web.Request) -> web.Response | None:
        """Why this /lb/* request is refused, or None."""
        if not self.origin_ok(request):
            return cross_site_refusal(request.path)
        if self.lb_token:
            if matches(bearer(request), self.lb_token) or self.has_session(request):
                return None
            return web.json_response({"error": "missing or wrong token: send Authorization: Bearer <token>"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="comfylb"'})
        if self.loopback_only and not is_loopback_client(request):
            return _error(403, "ComfyLB's /lb/* API answers this machine only: ComfyUI listens beyond localhost "
                               f"(--listen) and no token is set; set auth.token in {self.config or 'the config'} "
                               "(or COMFYLB_TOKEN), or auth.allow_open: true")
        return None

    def api_allowed(self, request: web.Request) -> bool:
        """ComfyUI's API and /ws when api_token guards them: the token as a Bearer header
        or ?token= (a browser's websocket cannot send headers), or the panel's session."""
        given = bearer(request) or request.rel_url.query.get("token")
        return matches(given, self.api_token) or self.has_session(request)

    def describe(self, api: bool = True) -> str:
        """What is guarded, for the log at start."""
        if self.lb_token:
            lb = f"guarded by {self.lb_token.source}"
        elif self.loopback_only:
            lb = "open to this machine only (ComfyUI listens beyond localhost and no token is set)"
        else:
            lb = "open"
        text = f"/lb/* {lb}"
        if api:
            text += f"; ComfyUI's API {'guarded by ' + self.api_token.source if self.api_token else 'open'}"
        return text


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def cross_site_refusal(path: str) -> web.Response:
    """A cross-site request refused: {"error"} on /lb/*, ComfyUI's error shape elsewhere."""
    from . import errors

    if path.startswith(("/lb/", "/api/lb/")):
        return _error(403, ORIGIN_REFUSED)
    refused = errors.error("forbidden", "Cross-site request refused: its Origin is not allowed", ORIGIN_REFUSED)
    return web.json_response(errors.error_body(refused), status=403)


# -- files -----------------------------------------------------------------------------------
# Shown inline: types a browser displays without running anything as a page of this origin.
_INLINE = re.compile(r"(image/(png|jpeg|gif|webp|avif|bmp|tiff|apng|x-icon|vnd\.microsoft\.icon)"
                     r"|video/[\w.+-]+|audio/[\w.+-]+|text/plain|application/json)")
# Never labelled as what they are (ComfyUI's own /view does the same).
_RELABEL = frozenset({"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                      "application/javascript", "text/css"})
_UNSAFE_IN_NAME = re.compile(r'["\\\x00-\x1f\x7f]')


def served_file_headers(content_type: str | None, filename: str, disposition: str | None = None) -> dict[str, str]:
    """Headers for a file a browser may open as a page: anything that could run script
    there (SVG, HTML, XHTML, XML, XSL, JS, CSS — any type not plainly an image, video,
    audio or text) is an attachment; nothing is sniffed into another type.  `disposition`:
    the one an inline file keeps (ComfyUI's `filename="…"`)."""
    ctype = content_type or "application/octet-stream"
    base = ctype.split(";", 1)[0].strip().lower()
    if base in _RELABEL:
        ctype = base = "application/octet-stream"
    headers = {"Content-Type": ctype, "X-Content-Type-Options": "nosniff"}
    name = _UNSAFE_IN_NAME.sub("_", filename)
    if not _INLINE.fullmatch(base):
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    elif disposition is not None:
        headers["Content-Disposition"] = disposition
    return headers


_DISPOSITION_NAME = re.compile(r'filename\s*=\s*"?([^";]*)"?', re.I)


def relayed_file_headers(headers: Mapping[str, str], fallback_name: str) -> dict[str, str]:
    """A peer's answer's headers, made safe the same way whatever the peer said."""
    given = headers.get("Content-Disposition")
    found = _DISPOSITION_NAME.search(given or "")
    inline = given if given is not None and not given.lower().startswith("inline") else None
    return served_file_headers(headers.get("Content-Type"), found.group(1) if found else fallback_name, inline)
