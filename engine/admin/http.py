"""The admin HTTP API's decisions, as pure functions. No I/O.

`engine.admin.server` moves bytes between sockets and these functions; every
answer a client can observe (status, JSON body, headers) is decided here, so it
is tested without a socket.

Rules this module owns:

1. Every answer is JSON (`application/json`); an error is
   `{"error": <code>, "message": <text naming the field and the fault>}`,
   plus `"topic"` when a topic name is at fault (`bad_topic`).
2. A request is judged from its head first (`plan_request`): 421, 404, 405,
   401, 403, 415 and 413 (declared length over the cap) are decided before any
   body byte is looked at; a refused body is only drained (within the cap),
   never parsed.
3. A publisher's `data` is encoded once: JSON `data` is packed to msgpack once;
   msgpack `data` goes to the bus as the publisher's bytes, byte for byte
   (`engine.protocol.codec` rule 1): sliced out of the body, or re-encoded
   only when the whole body re-encodes to exactly its own bytes.
4. A publish is all or nothing: one bad item refuses the whole body, and the
   error names the item (`items[3].key`).
5. Readiness and statistics are computed from the status board's statuses
   (engine.status, read by attribute) and a clock reading passed in; nothing
   here reads a file or the time.
6. Static files (the dashboard at `/`, the browser client under `/static/`)
   are named by `static_file`: a flat file name of safe characters with a
   known extension, or 404; it never names a path outside the static folder.
   They are the only answers that are not JSON.
7. Safe by default (issue 11, finding 5), decided from the head:
   - `Host` must name an IP address, "localhost" or a host of
     `server.admin_allowed_hosts`, else 421 on every path: a web page that
     rebinds its own DNS name to this machine cannot read /stats (its requests
     carry its own name). A request without `Host` (HTTP/1.0) is not a
     browser's and is served.
   - A POST needs the API key whenever the admin port listens beyond loopback
     (`bind_is_loopback`); with no key configured it is refused with 403 (the
     engine still starts: the probes must answer), naming the variable to set.
   - A POST body must declare `application/json` or `application/msgpack`
     (415 otherwise, and without `Content-Type`): what a page can send
     cross-origin without a CORS preflight (no type, `text/plain`, forms) is
     never taken for JSON.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import msgpack

from engine.bus.base import CheckedUpdates, Update
from engine.codes import ErrorCode
from engine.protocol.codec import (
    MAX_DATA_DEPTH,
    NIL,
    bounded_unpacker,
    container_at,
    data_problem,
    depth_problem,
    format_positions,
    nested_deeper_than,
    read_raw,
    utf8_problem,
    valid_topic,
    value_unpacker_kw,
)
from engine.status import SupervisorStatus, WorkerStatus

JSON_TYPE: Final = "application/json"
# Media types accepted as msgpack: the registered one and the two in common use.
MSGPACK_TYPES: Final = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
# Only types a web page cannot send cross-origin without a CORS preflight (rule 7).
JSON_TYPES: Final = frozenset({"application/json"})

# path -> methods allowed.
ROUTES: Final[Mapping[str, tuple[str, ...]]] = {
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/stats": ("GET",),
    "/metrics": ("GET",),
    "/publish": ("POST",),
    "/rebalance": ("POST",),
    "/": ("GET",),  # the live dashboard (engine/static/index.html)
    "/config.json": ("GET",),  # what the dashboard needs to connect (client_config)
}
STATIC_PREFIX: Final = "/static/"
# Served on the admin's probe connections too (over its general cap, rule 7 of
# engine.admin.server): what the kubelet and Prometheus ask.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
POST_PATHS: Final = frozenset(path for path, methods in ROUTES.items() if "POST" in methods)

# Extension -> Content-Type of the files under /static/.
STATIC_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",  # fanout.d.ts, for reading
    ".json": JSON_TYPE,
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
_STATIC_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")

# Worker counters summed in /stats totals, by their /stats name (each worker's
# status carries them).
COUNTERS: Final[tuple[tuple[str, Callable[[WorkerStatus], int]], ...]] = (
    ("connections", lambda st: st.connections),
    ("subscriptions", lambda st: st.subscriptions),
    ("topics", lambda st: st.topics),
    ("topics_dropped", lambda st: st.topics_dropped),
    ("updates_unheld", lambda st: st.updates_unheld),
    ("frames_sent", lambda st: st.frames_sent),
    ("bytes_sent", lambda st: st.bytes_sent),
    ("updates_delivered", lambda st: st.updates_delivered),
    ("slow_closes", lambda st: st.slow_closes),
)
_NO_STATUS: Final = WorkerStatus()  # what /stats shows of a worker with no status

_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_PUBLISH_FIELDS: Final = frozenset({"topic", "key", "data"})
_packer: Final = msgpack.Packer(use_bin_type=True)
_CONTAINERS: Final = frozenset({dict, list})
MIN_BODY_LIMIT_BYTES: Final = 1 << 20


# -- responses ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """An answer to send: status, JSON body bytes, extra headers (name, value)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON_TYPE


def response_bytes(response: Response, *, close: bool) -> bytes:
    """The whole HTTP/1.1 answer on the wire: status line, headers
    (Content-Type, Content-Length, `Cache-Control: no-store`, the response's
    own, `Connection: close` when `close`) and body."""
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}",
        f"content-type: {response.content_type}",
        f"content-length: {len(response.body)}",
        "cache-control: no-store",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    if close:
        lines.append("connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + response.body


def json_response(
    status: int, obj: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    # allow_nan=False: a NaN in a status file must not produce invalid JSON.
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, headers)


class HttpError(Exception):
    """A refused request: becomes `{"error", "message"[, "topic"]}` with `status`."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        topic: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.topic = topic
        self.headers = headers

    def response(self) -> Response:
        obj: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.topic is not None:
            obj["topic"] = self.topic
        return json_response(self.status, obj, self.headers)


def _bad(message: str, topic: str | None = None) -> HttpError:
    return HttpError(400, ErrorCode.BAD_REQUEST, message, topic=topic)


# -- the request head ---------------------------------------------------------------


def body_limit_bytes(max_message_bytes: int) -> int:
    """The largest request body accepted: a publish batch may hold several messages."""
    return max(MIN_BODY_LIMIT_BYTES, max_message_bytes * 4)


@dataclass(frozen=True, slots=True)
class Plan:
    """A request whose head was accepted: the route (its path) and, for /publish,
    the body's media kind ("json" or "msgpack")."""

    path: str
    media: str | None = None


def media_kind(content_type: str | None) -> str:
    """The body kind, "json" or "msgpack", for a Content-Type; raises HttpError(415).

    Parameters (`; charset=utf-8`) are ignored. No header, an empty one and
    every type a web page may send cross-origin without a preflight are
    refused (rule 7).
    """
    if content_type is None or not content_type.strip():
        raise HttpError(
            415,
            "unsupported_media_type",
            "a body needs 'Content-Type: application/json' or 'application/msgpack'",
        )
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in JSON_TYPES:
        return "json"
    if mime in MSGPACK_TYPES:
        return "msgpack"
    raise HttpError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type[:100]!r} is not accepted: "
        "send application/json or application/msgpack",
    )


@functools.lru_cache(maxsize=8)  # asked per request about the one bind address: parse it once
def bind_is_loopback(host: str) -> bool:
    """Whether an address the admin port binds is reachable from this machine
    only: "localhost" or a loopback IP address (127.0.0.0/8, ::1). "0.0.0.0",
    "::", "" and any other name are not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The host of a `Host` header, port and brackets removed, lower-cased,
    without a trailing dot: "[::1]:8001" -> "::1", "Example.COM.:80" -> "example.com"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host_header: str | None, allowed: Sequence[str]) -> bool:
    """Rule 7: an absent `Host`, an IP address, "localhost" (and its
    subdomains, which resolve to loopback), or a name of `allowed` ("*" = any,
    "*.example.com" = its subdomains)."""
    return _host_allowed(host_header, tuple(allowed))


@functools.lru_cache(maxsize=256)  # a publisher sends the same Host on every request
def _host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    if host_header is None or "*" in allowed:
        return True
    name = host_name(host_header)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    for pattern in allowed:
        pattern = pattern.rstrip(".")
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Raises HttpError(401) unless `api_key` is unset/empty or the header is
    `Bearer <api_key>`. Compared in constant time."""
    if not api_key:
        return
    challenge = (("www-authenticate", 'Bearer realm="fanout"'),)
    if authorization is None:
        raise HttpError(
            401,
            "unauthorized",
            "missing header 'Authorization: Bearer <api key>'",
            headers=challenge,
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode()
    ):
        raise HttpError(
            401, "unauthorized", "invalid API key in 'Authorization'", headers=challenge
        )


def plan_request(
    method: str,
    target: str,
    headers: Mapping[str, str],
    *,
    api_key: str | None,
    body_limit: int,
    bind_host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
    api_key_env: str = "FANOUT_API_KEY",
) -> Plan:
    """Judge a request from its head (lower-case header names). Raises HttpError
    for 421 (`Host` not allowed), 404, 405 (with `Allow`), 401, 403 (a POST on
    an admin port bound beyond loopback, `bind_host`, with no API key; the
    error names `api_key_env`), 415 and 413 (declared Content-Length over
    `body_limit`); the body, if any, is then read only for an accepted plan."""
    host = headers.get("host")
    if not host_allowed(host, allowed_hosts):
        shown = (host or "")[:100]
        raise HttpError(
            421,
            ErrorCode.BAD_HOST,
            f"Host {shown!r} is not served here: add it to server.admin_allowed_hosts"
            " (IP addresses and localhost are always served)",
        )
    path = target.split("?", 1)[0].split("#", 1)[0]
    methods = ROUTES.get(path)
    if methods is None and path.startswith(STATIC_PREFIX):
        static_file(path)  # 404 for a name that cannot be served
        methods = ("GET",)
    if methods is None:
        raise HttpError(404, "not_found", f"no such path {path[:100]!r}")
    if method not in methods:
        raise HttpError(
            405,
            "method_not_allowed",
            f"{method[:20]} is not allowed on {path}: use {', '.join(methods)}",
            headers=(("allow", ", ".join(methods)),),
        )
    if path not in POST_PATHS:
        return Plan(path)
    if not api_key and not bind_is_loopback(bind_host):
        where = (
            f"set the environment variable {api_key_env} (auth.api_key_env)"
            if api_key_env
            else "set auth.api_key_env to an environment variable holding a key"
        )
        raise HttpError(
            403,
            ErrorCode.FORBIDDEN,
            f"POST {path} is refused: the admin port listens on {bind_host[:60]!r}, beyond"
            f" loopback, and no API key is set: {where} and send"
            " 'Authorization: Bearer <key>'",
        )
    check_api_key(headers.get("authorization"), api_key)
    media = media_kind(headers.get("content-type"))
    if (declared_length(headers) or 0) > body_limit:
        raise too_large(body_limit)
    return Plan(path, media)


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The body length the head declares (Content-Length), None when it declares none."""
    length = headers.get("content-length", "").strip()
    return int(length) if length.isdigit() else None


def too_large(body_limit: int) -> HttpError:
    return HttpError(413, "too_large", f"request body over the limit of {body_limit} bytes")


# -- static files and the dashboard's settings ---------------------------------------


def static_file(path: str) -> tuple[str, str]:
    """The file name under the static folder and its Content-Type for a request
    path (`/` is `index.html`; `/static/<name>`); raises HttpError(404)."""
    name = "index.html" if path == "/" else path[len(STATIC_PREFIX) :]
    if not path.startswith(STATIC_PREFIX) and path != "/":
        raise HttpError(404, "not_found", f"no such path {path[:100]!r}")
    dot = name.rfind(".")
    ctype = STATIC_TYPES.get(name[dot:].lower()) if dot > 0 else None
    if _STATIC_NAME.fullmatch(name) is None or ".." in name or ctype is None:
        raise HttpError(404, "not_found", f"no such file {name[:100]!r}")
    return name, ctype


def static_response(content_type: str, body: bytes) -> Response:
    return Response(200, body, content_type=content_type)


def client_config(ws_port: int, ws_path: str) -> Response:
    """/config.json: where the dashboard's WebSocket is (the page joins it with
    the host name it was loaded from)."""
    return json_response(200, {"ws_port": ws_port, "ws_path": ws_path})


# -- the /publish body --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """What a /publish body asked for: the updates, and whether it was a batch
    (`{"items": [...]}`: the answer's `pos` is then a list)."""

    updates: tuple[Update, ...]
    batch: bool


def parse_publish(
    body: bytes, media: str, max_items: int, is_stream: Callable[[str], bool] | None = None
) -> PublishRequest:
    """Parse a /publish body (`media` from `media_kind`); raises HttpError(400).

    Accepts `{"topic", "key", "data"}` or `{"items": [{...}, ...]}` with 1 to
    `max_items` items. `data` is required (null deletes the key; for a stream
    topic it is an event whose data is null). `key` is required for state
    topics and optional for stream topics (`is_stream`, from the `[[topics]]`
    rules; an omitted key is ""). Unknown fields are refused (a misspelt field
    must not pass silently).
    """
    if media == "msgpack":
        request = _parse_msgpack(body, max_items)
    else:
        request = _parse_json(body, max_items)
    for i, u in enumerate(request.updates):
        if not u.key and (is_stream is None or not is_stream(u.topic)):
            where = f"items[{i}]." if request.batch else ""
            raise _bad(f"'{where}key' is required (the topic is a state topic)", u.topic)
    return request


def _check_item(fields: Mapping[str, Any], where: str) -> tuple[str, str]:
    """Validate topic and key of one item; returns them. `where` prefixes field names."""
    for name in fields:
        if name not in _PUBLISH_FIELDS:
            shown = name[:60] if isinstance(name, str) else repr(name)[:60]
            raise _bad(f"unknown field '{where}{shown}': expected 'topic', 'key', 'data'")
    if "topic" not in fields:
        raise _bad(f"'{where}topic' is required")
    topic = fields["topic"]
    if not isinstance(topic, str):
        raise _bad(f"'{where}topic' must be a string, not {_type_name(topic)}")
    if not valid_topic(topic):
        raise HttpError(
            400,
            ErrorCode.BAD_TOPIC,
            f"'{where}topic': bad topic name {topic[:60]!r} (1 to 200 of A-Z a-z 0-9 _ . : -)",
            topic=topic[:200],
        )
    # An omitted key is a stream topic's: parse_publish, which knows the modes, checks it.
    key = fields.get("key", "")
    if not isinstance(key, str):
        raise _bad(f"'{where}key' must be a string, not {_type_name(key)}", topic)
    if "key" in fields and not key:
        raise _bad(f"'{where}key' must not be empty", topic)
    problem = utf8_problem(key)  # JSON "\ud800": it would fail on the bus, not here
    if problem is not None:
        raise _bad(f"'{where}key' {problem}", topic)
    if "data" not in fields:
        raise _bad(f"'{where}data' is required (null deletes the key)", topic)
    return topic, key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        bytes: "binary",
    }.get(type(value), type(value).__name__)


def _check_items_count(n: int, max_items: int) -> None:
    if n == 0:
        raise _bad("'items' must not be empty")
    if n > max_items:
        raise _bad(f"'items' holds {n} items; the limit is {max_items}")


# JSON -----------------------------------------------------------------------------


def _parse_json(body: bytes, max_items: int) -> PublishRequest:
    if not body.strip():
        raise _bad("the body is empty: expected a JSON object")
    try:
        doc = json.loads(body)
    except RecursionError:
        raise _bad(
            f"undecodable JSON: nested too deeply ('data' may nest {MAX_DATA_DEPTH} levels)"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"undecodable JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise _bad(f"the body must be a JSON object, not {_type_name(doc)}")
    if "items" in doc:
        extra = sorted(k for k in doc if k != "items")
        if extra:
            raise _bad(f"use either 'items' or a single update, not both (found {extra[0]!r})")
        items = doc["items"]
        if not isinstance(items, list):
            raise _bad(f"'items' must be an array, not {_type_name(items)}")
        _check_items_count(len(items), max_items)
        updates = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _bad(f"'items[{i}]' must be an object, not {_type_name(item)}")
            updates.append(_json_update(item, f"items[{i}]."))
        return PublishRequest(CheckedUpdates(updates), batch=True)
    return PublishRequest((_json_update(doc, ""),), batch=False)


def _json_update(fields: dict[str, Any], where: str) -> Update:
    topic, key = _check_item(fields, where)
    value = fields["data"]
    if value is None:
        return Update(topic, key, NIL)
    if nested_deeper_than(value, MAX_DATA_DEPTH):
        raise _bad(f"'{where}data' {depth_problem()}", topic)
    try:
        data = msgpack.packb(value, use_bin_type=True)
    except UnicodeEncodeError as exc:  # a lone surrogate, in a string or an object key
        bad = f"U+{ord(exc.object[exc.start]):04X}"
        raise _bad(
            f"'{where}data' holds a string that is not valid UTF-8 (a lone surrogate, {bad},"
            " as JSON.stringify writes for half an emoji)",
            topic,
        ) from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise _bad(f"'{where}data' cannot be encoded as msgpack: {exc}", topic) from None
    return Update(topic, key, data)


# msgpack --------------------------------------------------------------------------


# The body is read with the codec's reader (engine.protocol.codec rules 1 and 3):
# limits bounded by the body's own size, containers told from their header byte,
# `data` sliced out undecoded.


def _msgpack_is_array(body: bytes, at: int) -> bool:
    shape = container_at(body, at)
    return shape is not None and shape[0] == "array"


def _msgpack_is_map(body: bytes, at: int) -> bool:
    shape = container_at(body, at)
    return shape is not None and shape[0] == "map"


def _parse_msgpack(body: bytes, max_items: int) -> PublishRequest:
    fast = _parse_msgpack_whole(body, max_items)
    return fast if fast is not None else _parse_msgpack_fields(body, max_items)


def _parse_msgpack_fields(body: bytes, max_items: int) -> PublishRequest:
    """The body read field by field: slower, and names any fault it finds."""
    if not body:
        raise _bad("the body is empty: expected a msgpack map")
    n = len(body)
    # strict_map_key=False: a field given a map with keys that are not strings
    # is refused by name ("'topic' must be a string"), not as undecodable
    unpacker = bounded_unpacker(n, strict_map_key=False)
    unpacker.feed(body)
    try:
        if not _msgpack_is_map(body, 0):
            raise _bad(f"the body must be a msgpack map, not {_type_name(unpacker.unpack())}")
        fields, data, items = _read_msgpack_fields(unpacker, body, "", max_items=max_items)
        if items is not None:
            if fields or data is not None:
                first = sorted(fields)[0] if fields else "data"
                raise _bad(f"use either 'items' or a single update, not both (found {first!r})")
            updates = tuple(items)
            result = PublishRequest(updates, batch=True)
        else:
            result = PublishRequest((_msgpack_update(fields, data, ""),), batch=False)
        if unpacker.tell() != n:
            raise _bad("trailing bytes after the msgpack map")
        return result
    except HttpError:
        raise
    except msgpack.OutOfData:
        raise _bad("truncated msgpack body") from None
    except Exception as exc:  # msgpack raises ValueError/TypeError subclasses of many kinds
        raise _bad(f"undecodable msgpack: {type(exc).__name__}") from None


def _parse_msgpack_whole(body: bytes, max_items: int) -> PublishRequest | None:
    """The common case in C: the body decoded whole, as a client decodes a
    value (so every `data` passes `data_problem` but for its depth, checked
    here); each `data` is then the publisher's bytes (rule 3), re-encoded when
    the whole body re-encodes to exactly itself (so does each part: the
    encoding is made of its parts'), else sliced out by a walk of the body.
    None for anything the field-by-field reader must judge and name (a fault,
    a duplicate field, a field name that is not a string): it gives the same
    answer to every body this one accepts."""
    try:
        doc = msgpack.unpackb(body, **value_unpacker_kw(len(body)))
    except Exception:  # the field-by-field reader names the fault
        return None
    if type(doc) is not dict:
        return None
    batch = "items" in doc
    items = doc["items"] if batch else [doc]
    if batch and (len(doc) != 1 or type(items) is not list or not 0 < len(items) <= max_items):
        return None
    if any(type(item) is not dict or "data" not in item for item in items):
        return None
    if _packer.pack(doc) == body:  # what nearly every msgpack library writes
        datas = [_packer.pack(item["data"]) for item in items]
    else:
        walked = _walk_data(body, items, batch)
        if walked is None:
            return None
        datas = walked
    fields, topics_ok = _PUBLISH_FIELDS, set()  # a topic is judged once per body
    updates = []
    for item, data in zip(items, datas, strict=True):
        topic, key = item.get("topic"), item.get("key", "")
        if (  # what _check_item accepts, in C where it can be: else it names the fault
            not item.keys() <= fields
            or type(topic) is not str
            or type(key) is not str
            or not (topic in topics_ok or valid_topic(topic))
            or not (key or "key" not in item)
            or not (key.isascii() or utf8_problem(key) is None)
        ):
            return None
        # nesting d levels deep takes d header bytes at least: a short value
        # cannot be too deep; nor can a flat one (told in C); the rest is walked
        if len(data) > MAX_DATA_DEPTH and _nested(item["data"]):
            return None
        topics_ok.add(topic)
        updates.append(Update(topic, key, data))
    return PublishRequest(CheckedUpdates(updates), batch=batch)


def _nested(value: Any) -> bool:
    """`nested_deeper_than(value, MAX_DATA_DEPTH)`, told at once for a scalar
    and for an array or map of scalars (the common value)."""
    if type(value) is dict:
        children: Any = value.values()
    elif type(value) is list:
        children = value
    else:
        return False
    if _CONTAINERS.isdisjoint(map(type, children)):
        return False
    return nested_deeper_than(value, MAX_DATA_DEPTH)


def _walk_data(body: bytes, items: list[dict[Any, Any]], batch: bool) -> list[bytes] | None:
    """Each item's `data` sliced out of `body` (a copy each); None when a map
    holds a field twice (the decode kept one of them)."""
    unpacker = bounded_unpacker(len(body), strict_map_key=False)
    unpacker.feed(body)
    if batch:
        unpacker.read_map_header()
        unpacker.skip()  # "items"
        unpacker.read_array_header()
    read_map_header, unpack = unpacker.read_map_header, unpacker.unpack
    skip, tell = unpacker.skip, unpacker.tell
    datas = []
    for item in items:
        if read_map_header() != len(item):
            return None
        for _ in range(len(item)):
            if unpack() == "data":
                start = tell()
                skip()
                datas.append(body[start : tell()])
            else:
                skip()
    return datas


def _read_msgpack_fields(
    unpacker: msgpack.Unpacker, body: bytes, where: str, *, max_items: int | None
) -> tuple[dict[str, Any], bytes | None, list[Update] | None]:
    """Read one map: its fields (unpacked), its `data` (exact bytes) and, at
    the top level only (`max_items` given), its `items` (parsed updates)."""
    fields: dict[str, Any] = {}
    data: bytes | None = None
    items: list[Update] | None = None
    for _ in range(unpacker.read_map_header()):
        try:
            name = unpacker.unpack()
        except UnicodeDecodeError:
            raise _bad(f"a field name in '{where or 'body'}' is not valid UTF-8") from None
        if not isinstance(name, str):
            raise _bad(
                f"field names must be strings, found {_type_name(name)} in '{where or 'body'}'"
            )
        if name in fields or (name == "data" and data is not None):
            raise _bad(f"field '{where}{name[:60]}' appears twice")
        if name == "data":
            data = read_raw(unpacker, body)
        elif name == "items" and max_items is not None:
            if items is not None:
                raise _bad("field 'items' appears twice")
            items = _read_msgpack_items(unpacker, body, max_items)
        else:
            try:
                fields[name] = unpacker.unpack()
            except UnicodeDecodeError:
                raise _bad(f"'{where}{name[:60]}' is not valid UTF-8") from None
    return fields, data, items


def _read_msgpack_items(unpacker: msgpack.Unpacker, body: bytes, max_items: int) -> list[Update]:
    if not _msgpack_is_array(body, unpacker.tell()):
        raise _bad(f"'items' must be an array, not {_type_name(unpacker.unpack())}")
    count = unpacker.read_array_header()
    _check_items_count(count, max_items)  # from the header, before reading any item
    updates: list[Update] = []
    for i in range(count):
        where = f"items[{i}]."
        if not _msgpack_is_map(body, unpacker.tell()):
            raise _bad(f"'items[{i}]' must be a map, not {_type_name(unpacker.unpack())}")
        fields, data, _ = _read_msgpack_fields(unpacker, body, where, max_items=None)
        updates.append(_msgpack_update(fields, data, where))
    return updates


def _msgpack_update(fields: dict[str, Any], data: bytes | None, where: str) -> Update:
    if data is not None:
        fields = {**fields, "data": None}  # presence only: the bytes are kept apart
    topic, key = _check_item(fields, where)
    assert data is not None  # _check_item refused a missing 'data'
    problem = data_problem(data)  # sliced, never decoded so far: UTF-8 and nesting
    if problem is not None:
        raise _bad(f"'{where}data' {problem}", topic)
    return Update(topic, key, data)


# -- answers --------------------------------------------------------------------------


def publish_response(request: PublishRequest, positions: Sequence[int]) -> Response:
    """200 `{"pos": "MS-SEQ"}` for one update, `{"pos": [...]}` for a batch."""
    wire = format_positions(positions)
    return json_response(200, {"pos": wire if request.batch else wire[0]})


def unavailable(message: str) -> Response:
    return json_response(503, {"error": ErrorCode.UNAVAILABLE, "message": message})


def supervisor_alive(
    supervisor: SupervisorStatus | None, now: float, timeout_s: float, parent_alive: bool
) -> bool:
    """The supervisor runs: its status is fresh, or our parent (it) is alive."""
    return parent_alive or (supervisor is not None and supervisor.age_s(now) < timeout_s)


def health(
    supervisor: SupervisorStatus | None, now: float, timeout_s: float, parent_alive: bool
) -> Response:
    """/healthz: 200 while the supervisor runs, else 503."""
    if supervisor_alive(supervisor, now, timeout_s, parent_alive):
        return json_response(200, {"status": "ok"})
    reason = "supervisor: no status" if supervisor is None else "supervisor: status stale"
    return json_response(503, {"status": "down", "reasons": [reason]})


def expected_workers(supervisor: SupervisorStatus | None) -> Mapping[int, int | None]:
    """Slot -> pid of the workers the supervisor runs (its status' `workers` map)."""
    return {} if supervisor is None else supervisor.workers


def readiness(
    supervisor: SupervisorStatus | None,
    workers: Mapping[int, WorkerStatus],
    *,
    now: float,
    heartbeat_timeout_s: float,
    parent_alive: bool,
    bus_connected: bool,
    max_lag_ms: float | None = None,
) -> tuple[bool, list[str]]:
    """Whether this node should receive traffic, and why not.

    Ready when the supervisor runs with state "running"; each worker slot it
    runs (`workers`: slot -> pid, at least `workers_expected` of them) has a
    fresh status (age < `heartbeat_timeout_s`) from that pid, accepting and
    connected to the bus (and, when it reports `bus_lag_ms` and `max_lag_ms`
    is given, not lagging past it); and the admin's own bus is connected.
    """
    reasons: list[str] = []
    if supervisor is None:
        reasons.append("supervisor: no status")
    elif not supervisor_alive(supervisor, now, heartbeat_timeout_s, parent_alive):
        reasons.append("supervisor: status stale")
    else:
        state = supervisor.state
        if state != "running":
            reasons.append(f"supervisor: {state[:40] if state is not None else 'no state'}")
    slots = expected_workers(supervisor)
    want = supervisor.workers_expected if supervisor is not None else None
    if want is not None and len(slots) < want:
        reasons.append(f"workers: {len(slots)} of {want} running")
    elif supervisor is not None and not slots:
        reasons.append("workers: none running")
    for slot in sorted(slots):
        reason = _worker_fault(workers.get(slot), slots[slot], now, heartbeat_timeout_s, max_lag_ms)
        if reason is not None:
            reasons.append(f"worker {slot}: {reason}")
    if not bus_connected:
        reasons.append("bus: disconnected")
    return not reasons, reasons


def _worker_fault(
    status: WorkerStatus | None,
    pid: int | None,
    now: float,
    timeout_s: float,
    max_lag_ms: float | None,
) -> str | None:
    if status is None:
        return "no status"
    age = status.age_s(now)
    if not age < timeout_s:
        return f"heartbeat stale ({age:.1f} s)" if math.isfinite(age) else "no heartbeat"
    if pid is not None and status.pid != pid:
        return f"status from pid {status.pid}, expected {pid}"
    if not status.accepting:
        return "not accepting"
    if not status.bus_connected:
        down = status.bus_tasks_down
        if down:  # engine/bus/tasks.py: failed, restarting
            return f"bus task {', '.join(d[:20] for d in down[:4])} restarting"
        return "bus disconnected"
    lag = status.bus_lag_ms
    if max_lag_ms is not None and lag is not None and lag > max_lag_ms:
        return f"bus lagging ({lag:.0f} ms > {max_lag_ms:.0f} ms)"
    return None


def ready_response(ready: bool, reasons: Sequence[str], workers: int) -> Response:
    if ready:
        return json_response(200, {"status": "ready", "workers": workers})
    return json_response(503, {"status": "not_ready", "reasons": list(reasons)})


def stats(
    *,
    node: str,
    started: float,
    supervisor: SupervisorStatus | None,
    workers: Mapping[int, WorkerStatus],
    now: float,
    bus: Mapping[str, Any],
) -> dict[str, Any]:
    """/stats: per-worker counters (those the supervisor runs, or every status
    on the board when it has none), their totals, the bus link (connected, lag:
    the worst shard's and each shard's, age of the last entry read) and uptime.

    `uptime_s` counts from the supervisor's `started` when it reports one, else
    from `started` (the admin's own start).
    """
    slots = expected_workers(supervisor)
    if not slots:
        slots = {slot: None for slot in workers}
    rows: list[dict[str, Any]] = []
    totals: dict[str, Any] = {name: 0 for name, _ in COUNTERS}
    for slot in sorted(slots):
        status = workers.get(slot, _NO_STATUS)
        pid = status.pid if status.pid is not None else slots[slot]
        row: dict[str, Any] = {"slot": slot, "pid": pid}
        for name, figure in COUNTERS:
            value = figure(status)
            row[name] = value
            totals[name] += value
        age = status.age_s(now)
        row["heartbeat_age_s"] = round(age, 3) if math.isfinite(age) else None
        row["accepting"] = status.accepting
        row["bus_connected"] = status.bus_connected
        row["bus_lag_ms"] = status.bus_lag_ms
        # index = shard; None on a bus without shards to report, or while disconnected
        shard_lags = status.bus_shard_lag_ms
        row["bus_shard_lag_ms"] = None if shard_lags is None else list(shard_lags)
        row["bus_last_entry_age_ms"] = status.bus_last_entry_age_ms
        rows.append(row)
    totals["workers"] = len(rows)
    sup_started = None if supervisor is None else supervisor.started
    begin = started if sup_started is None else sup_started
    return {
        "node": node,
        "uptime_s": round(max(0.0, now - begin), 3),
        "workers": rows,
        "totals": totals,
        "bus": dict(bus),
    }


# -- POST /rebalance ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RebalanceRequest:
    """Shed connections down to `connections` on this node, or shed `fraction` of them."""

    connections: int | None = None
    fraction: float | None = None


def parse_rebalance(body: bytes) -> RebalanceRequest:
    """`{"connections": N}` (keep at most N on this node) or `{"fraction": F}`
    (shed that share, 0 < F <= 1). 400 for anything else."""
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(doc, dict) or len(doc) != 1 or not ({"connections", "fraction"} & doc.keys()):
        raise HttpError(
            400, "bad_request", 'send exactly one of {"connections": N} or {"fraction": F}'
        )
    if "connections" in doc:
        n = doc["connections"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise HttpError(400, "bad_request", "'connections' must be an integer >= 0")
        return RebalanceRequest(connections=n)
    f = doc["fraction"]
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
        raise HttpError(400, "bad_request", "'fraction' must be a number in (0, 1]")
    return RebalanceRequest(fraction=float(f))


def plan_shedding(connections: Mapping[int, int], req: RebalanceRequest) -> dict[int, int]:
    """How many connections each worker (slot -> open connections) sheds.

    The excess over the target is taken from the workers in proportion to what
    they hold (the largest remainders first), so the node ends balanced too.
    """
    total = sum(connections.values())
    if req.connections is not None:
        excess = max(0, total - req.connections)
    else:
        assert req.fraction is not None
        excess = min(total, round(total * req.fraction))
    if excess == 0 or total == 0:
        return {}
    shares = {s: excess * n / total for s, n in connections.items()}
    plan = {s: int(v) for s, v in shares.items()}
    left = excess - sum(plan.values())
    for s in sorted(shares, key=lambda s: shares[s] - plan[s], reverse=True)[:left]:
        plan[s] += 1
    return {s: n for s, n in plan.items() if n > 0}
