"""The admin API's decisions (engine.admin.http), without a socket."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from engine.admin import http
from engine.admin.http import HttpError, parse_publish, plan_request
from engine.bus.base import Update
from engine.protocol.codec import NIL, Pub, decode_request, make_pos
from engine.status import SupervisorStatus, WorkerStatus

MAX_ITEMS = 5


def pj(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def pm(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def refused(body: bytes, media: str = "json", max_items: int = MAX_ITEMS) -> HttpError:
    with pytest.raises(HttpError) as info:
        parse_publish(body, media, max_items)
    return info.value


def body_of(response: http.Response) -> dict[str, Any]:
    out = json.loads(response.body)
    assert isinstance(out, dict)
    return out


# -- JSON bodies ------------------------------------------------------------------


def test_json_single_is_encoded_to_msgpack_once() -> None:
    req = parse_publish(
        pj({"topic": "prices.fx", "key": "EURUSD", "data": {"bid": 1.1}}), "json", 5
    )
    assert req.batch is False
    assert req.updates == (Update("prices.fx", "EURUSD", pm({"bid": 1.1})),)


def test_json_null_data_deletes_the_key() -> None:
    req = parse_publish(pj({"topic": "t", "key": "k", "data": None}), "json", 5)
    assert req.updates[0].data == NIL


def test_json_batch_keeps_order() -> None:
    items = [{"topic": "a", "key": f"k{i}", "data": i} for i in range(3)]
    req = parse_publish(pj({"items": items}), "json", 5)
    assert req.batch is True
    assert [(u.key, u.data) for u in req.updates] == [("k0", pm(0)), ("k1", pm(1)), ("k2", pm(2))]


def test_a_stream_topic_needs_no_key() -> None:
    def is_stream(topic: str) -> bool:
        return topic.startswith("ev.")

    req = parse_publish(pj({"topic": "ev.log", "data": 1}), "json", 5, is_stream)
    assert req.updates == (Update("ev.log", "", pm(1)),)
    req = parse_publish(pm({"topic": "ev.log", "key": "k", "data": 2}), "msgpack", 5, is_stream)
    assert req.updates == (Update("ev.log", "k", pm(2)),)
    body = pj({"items": [{"topic": "ev.a", "data": 1}, {"topic": "prices", "data": 2}]})
    with pytest.raises(HttpError) as info:
        parse_publish(body, "json", 5, is_stream)
    assert "'items[1].key' is required" in info.value.message
    with pytest.raises(HttpError) as info:
        parse_publish(pm({"topic": "prices", "data": 2}), "msgpack", 5, is_stream)
    assert "'key' is required" in info.value.message


def test_json_batch_of_one_is_still_a_batch() -> None:
    req = parse_publish(pj({"items": [{"topic": "a", "key": "k", "data": 1}]}), "json", 5)
    assert req.batch is True and len(req.updates) == 1


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"", "bad_request", "empty"),
        (b"{not json", "bad_request", "undecodable JSON"),
        (b"\xff\xfe\x00", "bad_request", "undecodable JSON"),
        (b"[" * 100_000, "bad_request", "undecodable JSON"),
        (pj([1, 2]), "bad_request", "JSON object"),
        (pj({"key": "k", "data": 1}), "bad_request", "'topic' is required"),
        (pj({"topic": 5, "key": "k", "data": 1}), "bad_request", "'topic' must be a string"),
        (pj({"topic": "bad topic", "key": "k", "data": 1}), "bad_topic", "'topic'"),
        (pj({"topic": "x" * 201, "key": "k", "data": 1}), "bad_topic", "'topic'"),
        (pj({"topic": "t", "data": 1}), "bad_request", "'key' is required"),
        (pj({"topic": "t", "key": 3, "data": 1}), "bad_request", "'key' must be a string"),
        (pj({"topic": "t", "key": "", "data": 1}), "bad_request", "'key' must not be empty"),
        (pj({"topic": "t", "key": "k"}), "bad_request", "'data' is required"),
        (pj({"topic": "t", "key": "k", "data": 2**70}), "bad_request", "'data' cannot be encoded"),
        (pj({"topic": "t", "key": "k", "data": 1, "tpoic": 2}), "bad_request", "'tpoic'"),
        (pj({"items": {"topic": "t"}}), "bad_request", "'items' must be an array"),
        (pj({"items": []}), "bad_request", "'items' must not be empty"),
        (pj({"items": [{"topic": "t", "key": "k", "data": 1}] * 6}), "bad_request", "limit is 5"),
        (pj({"items": [{"topic": "t", "key": "k", "data": 1}, 7]}), "bad_request", "'items[1]'"),
        (
            pj({"items": [{"topic": "t", "key": "k", "data": 1}, {"topic": "t", "data": 1}]}),
            "bad_request",
            "'items[1].key' is required",
        ),
        (
            pj({"items": [{"topic": "t", "key": "k", "data": 1}], "topic": "t"}),
            "bad_request",
            "either 'items'",
        ),
    ],
)
def test_json_bad_bodies_are_400_naming_the_fault(body: bytes, error: str, words: str) -> None:
    exc = refused(body)
    assert exc.status == 400
    assert exc.error == error
    assert words in exc.message
    shown = body_of(exc.response())
    assert shown["error"] == error and words in shown["message"]


def test_bad_topic_names_the_topic() -> None:
    exc = refused(pj({"items": [{"topic": "a b", "key": "k", "data": 1}]}))
    assert exc.error == "bad_topic"
    assert "'items[0].topic'" in exc.message
    assert body_of(exc.response())["topic"] == "a b"


def test_one_bad_item_refuses_the_whole_batch() -> None:
    items = [{"topic": "ok", "key": "k", "data": 1}] * 3 + [{"topic": "ok", "key": "", "data": 1}]
    exc = refused(pj({"items": items}))
    assert "'items[3].key'" in exc.message


# -- msgpack bodies ---------------------------------------------------------------

# Bytes a re-encoding would change: a float32, an int in a wider format than
# needed, a str8 header for a short string, a map with keys in a chosen order.
ODD_DATA = [
    b"\xca\x3f\xc0\x00\x00",  # float32 1.5 (packb would write float64)
    b"\xd1\x00\x01",  # int16 1 (packb would write fixint)
    b"\xd9\x03abc",  # str8 "abc" (packb would write fixstr)
    b"\x82\xa1z\x01\xa1a\x02",  # {"z": 1, "a": 2}
    b"\xc7\x02\x05hi",  # ext type 5
    NIL,
]


# A 'data' value nested deeper than msgpack's unpacker stack.
DEEP_DATA = (
    b"\x83" + pm("topic") + pm("t") + pm("key") + pm("k") + pm("data") + b"\x91" * 100_000 + b"\xc0"
)


def _raw_map(pairs: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map with values given as raw bytes (kept exactly)."""
    return bytes([0x80 | len(pairs)]) + b"".join(pm(k) + v for k, v in pairs)


@pytest.mark.parametrize("data", ODD_DATA)
def test_msgpack_single_keeps_data_bytes_exactly(data: bytes) -> None:
    body = _raw_map([("topic", pm("t.x")), ("data", data), ("key", pm("k"))])
    req = parse_publish(body, "msgpack", 5)
    assert req.batch is False
    assert req.updates == (Update("t.x", "k", data),)


def test_msgpack_batch_keeps_every_data_bytes_exactly() -> None:
    items = [
        _raw_map([("data", d), ("topic", pm("t")), ("key", pm(f"k{i}"))])
        for i, d in enumerate(ODD_DATA)
    ]
    body = pm("items").join([b"\x81", b"\x96" + b"".join(items)])
    req = parse_publish(body, "msgpack", 10)
    assert req.batch is True
    assert [u.data for u in req.updates] == ODD_DATA
    assert [u.key for u in req.updates] == [f"k{i}" for i in range(len(ODD_DATA))]


@pytest.mark.parametrize("data", ODD_DATA)
def test_msgpack_body_and_websocket_pub_read_data_alike(data: bytes) -> None:
    """One reader (engine.protocol.codec): the admin's /publish body and a
    WebSocket `pub` hand the bus the same `data` bytes."""
    fields = [("topic", pm("t.x")), ("key", pm("k")), ("data", data)]
    req = parse_publish(_raw_map(fields), "msgpack", 5)
    pub = decode_request(_raw_map([("op", pm("pub")), *fields]), 8)
    assert isinstance(pub, Pub)
    assert req.updates[0].data == pub.data == data


def test_msgpack_and_json_agree_on_plain_values() -> None:
    obj = {"topic": "t", "key": "k", "data": {"a": [1, "x", None, True]}}
    assert parse_publish(pm(obj), "msgpack", 5) == parse_publish(pj(obj), "json", 5)


def test_msgpack_body_fed_with_trailing_bytes_is_refused() -> None:
    body = pm({"topic": "t", "key": "k", "data": 1})
    assert "trailing" in refused(body + b"\x01", "msgpack").message


def test_msgpack_every_truncation_is_a_400() -> None:
    body = pm({"items": [{"topic": "t", "key": "k", "data": {"a": [1, 2, 3]}}]})
    for cut in range(len(body)):
        exc = refused(body[:cut], "msgpack")
        assert exc.status == 400, cut


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (pm([1]), "bad_request", "msgpack map"),
        (b"\xc1", "bad_request", "undecodable msgpack"),
        (pm({"topic": "t", "key": "k"}), "bad_request", "'data' is required"),
        (pm({"topic": "t", "data": 1}), "bad_request", "'key' is required"),
        (pm({"topic": "t", "key": b"k", "data": 1}), "bad_request", "'key' must be a string"),
        (pm({"topic": "no way", "key": "k", "data": 1}), "bad_topic", "'topic'"),
        (pm({1: "t", "key": "k", "data": 1}), "bad_request", "field names must be strings"),
        (pm({"topic": "t", "key": "k", "data": 1, "id": 1}), "bad_request", "'id'"),
        (pm({"items": "x"}), "bad_request", "'items' must be an array"),
        (pm({"items": []}), "bad_request", "'items' must not be empty"),
        (pm({"items": [{"topic": "t", "key": "k", "data": 1}] * 6}), "bad_request", "limit is 5"),
        (pm({"items": [5]}), "bad_request", "'items[0]' must be a map"),
        (pm({"items": [{"topic": "t", "key": "k"}]}), "bad_request", "'items[0].data'"),
        (
            pm({"items": [{"topic": "t", "key": "k", "data": 1}], "key": "k"}),
            "bad_request",
            "either",
        ),
        (DEEP_DATA, "bad_request", "undecodable msgpack"),
    ],
)
def test_msgpack_bad_bodies_are_400_naming_the_fault(body: bytes, error: str, words: str) -> None:
    exc = refused(body, "msgpack")
    assert (exc.status, exc.error) == (400, error)
    assert words in exc.message


def test_msgpack_duplicate_data_is_refused() -> None:
    body = _raw_map([("topic", pm("t")), ("key", pm("k")), ("data", pm(1)), ("data", pm(2))])
    assert "'data' appears twice" in refused(body, "msgpack").message


def test_msgpack_length_prefix_larger_than_body_is_refused_cheaply() -> None:
    body = b"\x81" + pm("data") + b"\xc6\x7f\xff\xff\xff"  # bin32 of 2 GiB
    assert refused(body, "msgpack").status == 400


# -- the request head -------------------------------------------------------------

LIMIT = 1 << 20


def plan(
    method: str,
    target: str,
    api_key: str | None = None,
    *,
    bind_host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    **headers: str,
) -> http.Plan:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if method == "POST":
        hdrs.setdefault("content-type", "application/json")
    return plan_request(
        method,
        target,
        hdrs,
        api_key=api_key,
        body_limit=LIMIT,
        bind_host=bind_host,
        allowed_hosts=allowed_hosts,
        api_key_env="FANOUT_API_KEY",
    )


def plan_refused(method: str, target: str, api_key: str | None = None, **kwargs: Any) -> HttpError:
    with pytest.raises(HttpError) as info:
        plan(method, target, api_key, **kwargs)
    return info.value


def test_routes_and_query_strings() -> None:
    assert plan("GET", "/readyz?verbose=1").path == "/readyz"
    assert plan("GET", "/healthz").path == "/healthz"
    assert plan("GET", "/stats").path == "/stats"
    assert plan("POST", "/publish") == http.Plan("/publish", "json")


def test_unknown_path_is_404_json() -> None:
    exc = plan_refused("GET", "/nope")
    assert exc.status == 404
    assert body_of(exc.response())["error"] == "not_found"


def test_wrong_method_is_405_with_allow() -> None:
    exc = plan_refused("GET", "/publish")
    assert exc.status == 405
    assert ("allow", "POST") in exc.response().headers
    assert ("allow", "GET") in plan_refused("POST", "/stats").response().headers


@pytest.mark.parametrize(
    ("content_type", "media"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/JSON", "json"),
        ("application/msgpack", "msgpack"),
        ("Application/MsgPack", "msgpack"),
        ("application/x-msgpack", "msgpack"),
    ],
)
def test_content_types(content_type: str, media: str) -> None:
    assert plan("POST", "/publish", content_type=content_type).media == media


def test_wrong_content_type_is_415() -> None:
    exc = plan_refused("POST", "/publish", content_type="text/plain")
    assert exc.status == 415
    assert "text/plain" in exc.message


# What a web page may send cross-origin without a CORS preflight, and types
# that were once taken for JSON: never accepted (rule 7).
@pytest.mark.parametrize(
    "content_type",
    [
        "",
        " ",
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json",
        "application/vnd.api+json",
    ],
)
def test_bodies_a_page_can_send_cross_origin_are_415(content_type: str) -> None:
    for path in ("/publish", "/rebalance"):
        exc = plan_refused("POST", path, content_type=content_type)
        assert exc.status == 415
        assert body_of(exc.response())["error"] == "unsupported_media_type"


def test_a_body_without_content_type_is_415() -> None:
    with pytest.raises(HttpError) as info:
        plan_request("POST", "/publish", {}, api_key=None, body_limit=LIMIT)
    assert info.value.status == 415
    assert "application/json" in info.value.message


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("fanout-admin", False),
        ("localhost.example.com", False),
    ],
)
def test_bind_is_loopback(host: str, loopback: bool) -> None:
    assert http.bind_is_loopback(host) is loopback


@pytest.mark.parametrize("path", ["/publish", "/rebalance"])
@pytest.mark.parametrize("bind_host", ["0.0.0.0", "::", "10.0.0.5", "fanout-admin"])
def test_posts_beyond_loopback_without_a_key_are_403_naming_the_variable(
    path: str, bind_host: str
) -> None:
    exc = plan_refused("POST", path, bind_host=bind_host)
    assert exc.status == 403
    body = body_of(exc.response())
    assert body["error"] == "forbidden" and "FANOUT_API_KEY" in body["message"]
    assert bind_host in body["message"]
    # With a key, the key decides; reads need none; loopback needs none.
    assert plan_refused("POST", path, "k", bind_host=bind_host).status == 401
    assert plan("POST", path, "k", bind_host=bind_host, authorization="Bearer k").path == path
    assert plan("GET", "/stats", bind_host=bind_host).path == "/stats"
    assert plan("POST", path, bind_host="127.0.0.1").path == path


def test_the_403_says_what_to_set_when_no_key_variable_is_named() -> None:
    with pytest.raises(HttpError) as info:
        plan_request(
            "POST",
            "/publish",
            {"content-type": "application/json"},
            api_key=None,
            body_limit=LIMIT,
            bind_host="0.0.0.0",
            api_key_env="",
        )
    assert info.value.status == 403 and "set auth.api_key_env" in info.value.message


def test_admin_allowed_hosts_setting_is_checked_and_read_from_the_environment() -> None:
    from engine.config import parse_config
    from engine.errors import ConfigError

    env = {"FANOUT_SERVER_ADMIN_ALLOWED_HOSTS": '["Fanout-Admin", "*.svc.cluster.local", "*"]'}
    cfg = parse_config({}, env)
    assert cfg.server.admin_allowed_hosts == ("fanout-admin", "*.svc.cluster.local", "*")
    for bad in (["a b"], ["http://x"], ["x:8001"], "fanout-admin", [1], ["*.*.x"]):
        with pytest.raises(ConfigError) as info:
            parse_config({"server": {"admin_allowed_hosts": bad}}, {})
        assert info.value.key == "server.admin_allowed_hosts"
    for key, bad_value in (("admin_idle_timeout_s", 0), ("admin_probe_connections", 0)):
        with pytest.raises(ConfigError) as info:
            parse_config({"server": {key: bad_value}}, {})
        assert info.value.key == f"server.{key}"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("example.com", "example.com"),
        ("Example.COM.:8001", "example.com"),
        ("[::1]:8001", "::1"),
        ("[::1]", "::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        (" localhost ", "localhost"),
    ],
)
def test_host_name(header: str, name: str) -> None:
    assert http.host_name(header) == name


@pytest.mark.parametrize(
    ("header", "allowed", "ok"),
    [
        (None, (), True),  # HTTP/1.0 without Host: not a browser
        ("127.0.0.1:8001", (), True),
        ("10.244.1.7:8001", (), True),  # the kubelet's probe: the pod IP
        ("[::1]:8001", (), True),
        ("[fe80::1]", (), True),
        ("localhost:8001", (), True),
        ("app.localhost", (), True),
        ("evil.example", (), False),
        ("evil.example:8001", (), False),
        ("127.0.0.1.evil.example", (), False),
        ("", (), False),
        ("fanout-admin:8001", ("fanout-admin",), True),
        ("FANOUT-ADMIN.", ("fanout-admin",), True),
        ("fanout-admin.evil", ("fanout-admin",), False),
        ("a.svc.cluster.local", ("*.svc.cluster.local",), True),
        ("svc.cluster.local", ("*.svc.cluster.local",), False),
        ("xsvc.cluster.local", ("*.svc.cluster.local",), False),
        ("anything.example", ("*",), True),
    ],
)
def test_host_allowed(header: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    assert http.host_allowed(header, allowed) is ok


def test_a_host_not_allowed_is_421_on_every_path_before_routing() -> None:
    for method, path in (("GET", "/stats"), ("GET", "/nope"), ("POST", "/publish")):
        exc = plan_refused(method, path, host="rebound.example")
        assert exc.status == 421
        body = body_of(exc.response())
        assert body["error"] == "bad_host" and "rebound.example" in body["message"]
        assert "server.admin_allowed_hosts" in body["message"]
    assert plan("GET", "/stats", host="rebound.example", allowed_hosts=("rebound.example",))


def test_declared_body_over_the_limit_is_413() -> None:
    assert plan_refused("POST", "/publish", content_length=str(LIMIT + 1)).status == 413
    assert plan("POST", "/publish", content_length=str(LIMIT)).path == "/publish"


def test_body_limit_follows_max_message_bytes() -> None:
    assert http.body_limit_bytes(1000) == 1 << 20
    assert http.body_limit_bytes(1 << 20) == 4 << 20


def test_api_key_required_when_set() -> None:
    assert plan("POST", "/publish", "s3cret", authorization="Bearer s3cret").path == "/publish"
    assert plan("POST", "/publish", "s3cret", authorization="bearer s3cret").path == "/publish"
    for auth in (None, "Bearer wrong", "Basic s3cret", "Bearer", "s3cret"):
        headers = {} if auth is None else {"authorization": auth}
        exc = plan_refused("POST", "/publish", "s3cret", **headers)
        assert exc.status == 401
        assert body_of(exc.response())["error"] == "unauthorized"
        assert any(name == "www-authenticate" for name, _ in exc.response().headers)


def test_api_key_checked_before_content_type() -> None:
    # An unauthenticated client learns nothing about what the endpoint accepts.
    assert plan_refused("POST", "/publish", "k", content_type="text/plain").status == 401


def test_probes_need_no_api_key() -> None:
    assert plan("GET", "/readyz", "s3cret").path == "/readyz"


# -- answers ----------------------------------------------------------------------


def test_publish_answers_a_position_or_a_list() -> None:
    single = http.PublishRequest((Update("t", "k", NIL),), batch=False)
    batch = http.PublishRequest((Update("t", "k", NIL),) * 2, batch=True)
    assert body_of(http.publish_response(single, [make_pos(12, 3)])) == {"pos": "12-3"}
    assert body_of(http.publish_response(batch, [make_pos(12, 3), make_pos(12, 4)])) == {
        "pos": ["12-3", "12-4"]
    }


def test_unavailable_is_503_json() -> None:
    r = http.unavailable("hub down")
    assert r.status == 503
    assert body_of(r) == {"error": "unavailable", "message": "hub down"}


NOW = 1_000_000.0


def sup(
    state: str = "running", workers: dict[str, int] | None = None, **extra: Any
) -> SupervisorStatus:
    """A supervisor status as the admin reads it from the board's JSON."""
    workers = {"1": 101, "2": 102} if workers is None else workers
    return SupervisorStatus.from_json(
        {
            "ts": NOW - 1,
            "state": state,
            "workers_expected": len(workers),
            "workers": workers,
            **extra,
        }
    )


def worker(pid: int, *, age: float = 0.5, **extra: Any) -> WorkerStatus:
    """A worker status as the admin reads it from the board's JSON."""
    return WorkerStatus.from_json(
        {"ts": NOW - age, "pid": pid, "accepting": True, "bus_connected": True, **extra}
    )


def ready(
    supervisor: SupervisorStatus | None, workers: dict[int, WorkerStatus], **kw: Any
) -> tuple[bool, list[str]]:
    args: dict[str, Any] = {
        "now": NOW,
        "heartbeat_timeout_s": 10.0,
        "parent_alive": False,
        "bus_connected": True,
        "max_lag_ms": 5000,
    }
    args.update(kw)
    return http.readiness(supervisor, workers, **args)


def test_ready_when_all_is_well() -> None:
    assert ready(sup(), {1: worker(101), 2: worker(102)}) == (True, [])


def test_not_ready_names_every_reason() -> None:
    ok, reasons = ready(
        sup("draining", workers={"1": 101, "2": 102, "3": 103, "4": 104, "5": 105}),
        {
            1: worker(101, accepting=False),
            2: worker(102, age=30),
            3: worker(99),
            4: worker(104, bus_connected=False),
        },
        bus_connected=False,
    )
    assert not ok
    assert reasons == [
        "supervisor: draining",
        "worker 1: not accepting",
        "worker 2: heartbeat stale (30.0 s)",
        "worker 3: status from pid 99, expected 103",
        "worker 4: bus disconnected",
        "worker 5: no status",
        "bus: disconnected",
    ]


def test_not_ready_without_any_status() -> None:
    assert ready(None, {}) == (False, ["supervisor: no status"])


def test_not_ready_when_fewer_workers_than_expected() -> None:
    ok, reasons = ready(sup(workers={"1": 101}, workers_expected=2), {1: worker(101)})
    assert not ok and reasons == ["workers: 1 of 2 running"]


def test_not_ready_when_a_worker_lags() -> None:
    _, reasons = ready(sup(), {1: worker(101, bus_lag_ms=9000), 2: worker(102, bus_lag_ms=10)})
    assert reasons == ["worker 1: bus lagging (9000 ms > 5000 ms)"]


def test_stale_supervisor_is_alive_while_it_is_our_parent() -> None:
    stale = sup(ts=NOW - 60)
    workers = {1: worker(101), 2: worker(102)}
    assert ready(stale, workers) == (False, ["supervisor: status stale"])
    assert ready(stale, workers, parent_alive=True) == (True, [])


def test_health() -> None:
    assert http.health(sup(), NOW, 10, False).status == 200
    assert body_of(http.health(sup(), NOW, 10, False)) == {"status": "ok"}
    assert http.health(None, NOW, 10, True).status == 200
    assert http.health(None, NOW, 10, False).status == 503
    assert http.health(sup(ts=NOW - 11), NOW, 10, False).status == 503


def test_ready_response_shapes() -> None:
    assert http.ready_response(True, [], 2).status == 200
    assert body_of(http.ready_response(True, [], 2))["status"] == "ready"
    r = http.ready_response(False, ["bus: disconnected"], 2)
    assert r.status == 503
    assert body_of(r) == {"status": "not_ready", "reasons": ["bus: disconnected"]}


def test_stats_sums_workers_and_counts_uptime_from_the_supervisor() -> None:
    counters = {
        "connections": 3,
        "subscriptions": 5,
        "topics": 4,
        "topics_dropped": 17,
        "updates_unheld": 19,
        "frames_sent": 7,
        "bytes_sent": 11,
        "updates_delivered": 13,
        "slow_closes": 1,
    }
    out = http.stats(
        node="n1",
        started=NOW - 5,
        supervisor=sup(started=NOW - 100),
        workers={1: worker(101, **counters), 2: worker(102, age=2, **counters), 9: worker(109)},
        now=NOW,
        bus={"backend": "local", "connected": True, "epoch": "e"},
    )
    assert out["node"] == "n1"
    assert out["uptime_s"] == 100
    assert [w["slot"] for w in out["workers"]] == [1, 2]  # slot 9 is not the supervisor's
    assert out["workers"][1]["heartbeat_age_s"] == 2
    assert out["workers"][0]["pid"] == 101
    assert out["totals"] == {k: 2 * v for k, v in counters.items()} | {"workers": 2}
    assert out["bus"] == {"backend": "local", "connected": True, "epoch": "e"}
    json.dumps(out, allow_nan=False)


def test_stats_without_supervisor_lists_the_board() -> None:
    out = http.stats(
        node="n",
        started=NOW - 5,
        supervisor=None,
        workers={3: worker(7, connections=2)},
        now=NOW,
        bus={},
    )
    assert out["uptime_s"] == 5
    assert out["workers"][0]["slot"] == 3 and out["totals"]["connections"] == 2


def test_stats_shows_each_shards_lag_and_the_last_entry_age() -> None:
    out = http.stats(
        node="n",
        started=NOW,
        supervisor=sup(),
        workers={
            1: worker(101, bus_lag_ms=900.0, bus_shard_lag_ms=[0.0, 900.0, 12.5],
                      bus_last_entry_age_ms=40.0),
            2: worker(102, bus_shard_lag_ms=None),  # disconnected, or the local bus
        },
        now=NOW,
        bus={},
    )  # fmt: skip
    one, two = out["workers"]
    assert one["bus_shard_lag_ms"] == [0.0, 900.0, 12.5]
    assert one["bus_last_entry_age_ms"] == 40.0
    assert two["bus_shard_lag_ms"] is None and two["bus_last_entry_age_ms"] is None
    json.dumps(out, allow_nan=False)


def test_stats_of_a_missing_worker_status() -> None:
    out = http.stats(node="n", started=NOW, supervisor=sup(), workers={}, now=NOW, bus={})
    assert out["workers"][0]["pid"] == 101
    assert out["workers"][0]["heartbeat_age_s"] is None
    assert out["totals"]["connections"] == 0
