"""The `fanout` command: serve | publish | watch | check-config | bench.

Settings come from config.toml, then FANOUT_<SECTION>_<KEY> environment
variables, then these flags; a bad value stops here, before anything forks,
with an error naming the key (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from engine import __version__, codes
from engine.config import Config, dump_toml, load_config, url_has_password
from engine.errors import ConfigError, EngineError

DESCRIPTION = """\
fanout: a WebSocket broadcast engine for live state feeds.

Publishers send updates for keys of topics (prices.fx / EURUSD); fanout keeps
every subscribed client at the latest value of every key, coalescing bursts,
bounding what it buffers for a slow client, and recovering a reconnecting
client from its last position.
"""

EPILOG = """\
examples:
  fanout serve --demo                      run with a built-in price feed
  fanout watch prices.fx                   watch a topic live in the terminal
  fanout publish prices.fx EURUSD '{"px": 1.0842}'
  fanout check-config                      print the effective settings
  fanout bench --baseline                  load-test fanout next to a naive broadcaster
  FANOUT_SERVER_PORT=9000 fanout serve     any setting from the environment

Settings: config.toml (or --config / FANOUT_CONFIG), then FANOUT_<SECTION>_<KEY>
environment variables, then flags. Protocol: docs/protocol.md.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        return cmd_bench(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return codes.EXIT_CONFIG
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        return codes.EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fanout",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fanout {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the engine: supervisor, workers, embedded bus, admin HTTP",
        description="Run the engine. Ctrl-C (SIGINT) stops quickly; SIGTERM drains "
        "gracefully (clients get `bye` and close 1001).",
    )
    _config_arg(s)
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (0 = one per core) [workers.count]",
    )
    s.add_argument("--host", metavar="HOST", help="WebSocket listen address [server.host]")
    s.add_argument(
        "--port", type=int, metavar="P", help="WebSocket port (0 = any free port) [server.port]"
    )
    s.add_argument(
        "--admin-port", type=int, metavar="P", help="admin HTTP port [server.admin_port]"
    )
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="[log.level]")
    s.add_argument(
        "--demo",
        action="store_true",
        help="publish a built-in price feed (prices.fx, prices.crypto, prices.equities)",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "check-config", help="validate the settings and print the effective config as TOML"
    )
    _config_arg(c)
    c.set_defaults(func=cmd_check_config)

    pub = sub.add_parser(
        "publish",
        help="publish one update through the admin HTTP API",
        description="Publish one update: DATA is JSON (null deletes the key). "
        "Sends `Authorization: Bearer $FANOUT_API_KEY` when that variable is set.",
    )
    _config_arg(pub)
    pub.add_argument("topic")
    pub.add_argument("key")
    pub.add_argument("data", help="the value, as JSON")
    pub.add_argument(
        "--admin", metavar="URL", help="admin base URL (default: from server.admin_host/admin_port)"
    )
    pub.set_defaults(func=cmd_publish)

    w = sub.add_parser(
        "watch",
        help="subscribe to topics and show their latest state live",
        description="Subscribe and show a live table of every key (a terminal redraws "
        "in place; otherwise one line per update).",
    )
    _config_arg(w)
    w.add_argument("topics", nargs="+", metavar="TOPIC")
    w.add_argument("--url", help="WebSocket URL (default: from server.port/path on 127.0.0.1)")
    w.add_argument(
        "--max-hz", type=float, help="ask for at most this many updates per second per topic"
    )
    w.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)"
    )
    w.set_defaults(func=cmd_watch)

    # `fanout bench ...` is dispatched by main() before parsing (its flags are the load
    # generator's: loadtest/bench); this entry only lists it in --help.
    sub.add_parser(
        "bench",
        help="run the load generator against fanout (and the baseline): `fanout bench --help`",
        add_help=False,
    )
    return p


def cmd_bench(argv: list[str]) -> int:
    """Delegate to the load generator (loadtest.bench); imported only when used."""
    import importlib

    try:
        bench = importlib.import_module("loadtest.bench")
    except ImportError as exc:
        print(f"fanout: bench needs the loadtest package: {exc}", file=sys.stderr)
        return codes.EXIT_CONFIG
    return int(bench.main(argv))


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="config file (default: $FANOUT_CONFIG or ./config.toml)"
    )


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(args.config, os.environ, overrides or {})


# -- check-config ----------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sys.stdout.write(dump_toml(cfg))  # a password in bus.redis.url is written as ***
    if url_has_password(cfg.bus.redis.url):
        print(
            "fanout: warning: bus.redis.url holds a password: move it to the environment"
            f" variable {cfg.bus.redis.password_env or 'named by bus.redis.password_env'}"
            " (bus.redis.password_env)",
            file=sys.stderr,
        )
    return codes.EXIT_OK


# -- serve -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(
        args,
        {
            "workers.count": args.workers,
            "server.host": args.host,
            "server.port": args.port,
            "server.admin_port": args.admin_port,
            "log.level": args.log_level,
        },
    )
    from engine.logs import setup_logging
    from engine.supervisor.preflight import PortUnavailable, check_port, make_run_dir

    setup_logging(cfg.log.level, cfg.log.format, "supervisor")
    try:
        port = check_port(cfg.server.host, cfg.server.port, "server.port")
        admin_port = check_port(cfg.server.admin_host, cfg.server.admin_port, "server.admin_port")
    except PortUnavailable as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        return codes.EXIT_PORT_IN_USE
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, port=port, admin_port=admin_port)
    )
    base = os.environ.get("FANOUT_RUN_DIR") or _default_run_base()
    run_dir = make_run_dir(base)
    _print_banner(cfg, args.demo)
    overrides = {
        "workers.count": args.workers,
        "log.level": args.log_level,
        # what the running node is bound to cannot change on reload
        "server.host": cfg.server.host,
        "server.port": cfg.server.port,
        "server.admin_host": cfg.server.admin_host,
        "server.admin_port": cfg.server.admin_port,
    }
    return _run_arbiter(cfg, run_dir, demo=args.demo, reload=lambda: _load(args, overrides))


def _default_run_base() -> str:
    from engine.board import default_run_dir

    return default_run_dir()


def _run_arbiter(
    cfg: Config, run_dir: str, *, demo: bool, reload: Callable[[], Config] | None = None
) -> int:
    from engine.admin.server import run_admin
    from engine.bus import hub_socket_path
    from engine.supervisor.arbiter import Arbiter, AuxSpec
    from workers.main import run_worker

    aux: list[AuxSpec] = []
    if cfg.bus.backend == "local":
        from engine.bus.hub import run_hub

        sock_path = hub_socket_path(run_dir)
        aux.append(
            AuxSpec(
                "hub",
                lambda: run_hub(cfg, run_dir),
                start_before_workers=True,
                ready=lambda: _unix_socket_accepts(sock_path),
            )
        )
    aux.append(AuxSpec("admin", lambda: run_admin(cfg, run_dir)))
    if demo:
        from engine.demo import run_demo

        aux.append(AuxSpec("demo", lambda: run_demo(cfg, run_dir)))
    # Workers forked after a SIGHUP get the reloaded config; the hub, admin and
    # demo processes keep the one they started with.
    current = {"cfg": cfg}

    def reload_config() -> Config:
        assert reload is not None
        current["cfg"] = reload()
        return current["cfg"]

    arbiter = Arbiter(
        cfg,
        run_dir,
        worker_target=lambda slot: run_worker(current["cfg"], slot, run_dir),
        aux=aux,
        remove_run_dir=True,
        reload=reload_config if reload is not None else None,
    )
    return arbiter.run()


def _unix_socket_accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.2)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _api_key_set(cfg: Config) -> bool:
    return bool(cfg.auth.api_key_env and os.environ.get(cfg.auth.api_key_env))


def _public_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _print_banner(cfg: Config, demo: bool) -> None:
    from engine.admin.http import bind_is_loopback
    from engine.supervisor.preflight import available_cpus

    n = cfg.resolved_worker_count(available_cpus())
    host = _public_host(cfg.server.host)
    ws = f"ws://{host}:{cfg.server.port}{cfg.server.path}"
    admin = f"http://{_public_host(cfg.server.admin_host)}:{cfg.server.admin_port}"
    lines = [
        f"fanout {__version__}: {n} worker{'s' if n != 1 else ''}, bus {cfg.bus.backend}",
        f"  WebSocket  {ws}"
        + ("   (listening on all interfaces)" if cfg.server.host in ("0.0.0.0", "::") else ""),
        f"  admin      {admin}   (/healthz /readyz /stats, POST /publish)",
    ]
    if not _api_key_set(cfg) and not bind_is_loopback(cfg.server.admin_host):
        lines.append(
            f"  WARNING    the admin port listens on {cfg.server.admin_host}, beyond loopback,"
            f" with no API key: POST /publish and /rebalance are refused (403) until"
            f" {cfg.auth.api_key_env or 'auth.api_key_env'} is set"
        )
    if demo:
        from engine.demo import DEMO_TOPICS

        lines.append(f"  demo feed  {', '.join(DEMO_TOPICS)}: 300 keys, ~400 updates/s")
        lines.append(f"  watch it   fanout watch prices.fx --url {ws}")
    lines.append(
        f"  publish    fanout publish prices.fx EURUSD '{{\"px\": 1.0842}}' --admin {admin}"
    )
    lines.append("  stop       Ctrl-C (quick) or SIGTERM (graceful drain)")
    if cfg.log.format == "json":  # log shippers want one JSON object per line
        logging.getLogger("fanout.supervisor").info(" | ".join(x.strip() for x in lines))
    else:
        print("\n".join(lines), file=sys.stderr, flush=True)


# -- publish ---------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"fanout: DATA is not valid JSON: {exc}", file=sys.stderr)
        return codes.EXIT_CONFIG
    base = args.admin
    if not base:
        cfg = _load(args)
        base = f"http://{_public_host(cfg.server.admin_host)}:{cfg.server.admin_port}"
        key_env = cfg.auth.api_key_env
    else:
        key_env = "FANOUT_API_KEY"
    body = json.dumps({"topic": args.topic, "key": args.key, "data": data}).encode()
    req = urllib.request.Request(
        base.rstrip("/") + "/publish",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    api_key = os.environ.get(key_env, "") if key_env else ""
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"fanout: publish refused: HTTP {exc.code} {detail}", file=sys.stderr)
        return codes.EXIT_FAILURE
    except (urllib.error.URLError, OSError) as exc:
        print(f"fanout: cannot reach the admin API at {base}: {exc}", file=sys.stderr)
        return codes.EXIT_FAILURE
    print(f"published {args.topic}/{args.key} at position {answer.get('pos')}")
    return codes.EXIT_OK


# -- watch -----------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    import uvloop

    from engine.protocol.codec import valid_topic

    for t in args.topics:
        if not valid_topic(t):
            print(f"fanout: {t!r} is not a valid topic name", file=sys.stderr)
            return codes.EXIT_CONFIG
    url = args.url
    if not url:
        cfg = _load(args)
        url = f"ws://127.0.0.1:{cfg.server.port}{cfg.server.path}"
    try:
        return int(uvloop.run(_watch(url, args.topics, args.max_hz, args.seconds)))
    except (OSError, EngineError) as exc:
        print(f"fanout: cannot watch {url}: {exc}", file=sys.stderr)
        return codes.EXIT_FAILURE


async def _watch(url: str, topics: list[str], max_hz: float | None, seconds: float) -> int:
    import asyncio
    import time

    from engine.client.raw import ConnectionClosed, connect

    logging.getLogger("picows").setLevel(logging.WARNING)
    conn = await connect(url)
    await conn.recv()  # hello
    conn.subscribe(topics, id=1, max_hz=max_hz)
    state: dict[str, dict[str, Any]] = {t: {} for t in topics}
    tty = sys.stdout.isatty()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds if seconds else float("inf")
    received = 0
    last_draw = 0.0
    last_latency_ms: float | None = None
    while loop.time() < end:
        try:
            msg = await conn.recv(timeout=min(1.0, max(0.01, end - loop.time())))
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            print(f"connection closed by the server: {exc.code} {exc.reason}", file=sys.stderr)
            return codes.EXIT_FAILURE
        op = msg.get("op")
        if op == "err":
            print(f"error: {msg.get('code')}: {msg.get('msg')}", file=sys.stderr)
            return codes.EXIT_FAILURE
        if op not in ("snap", "upd"):
            continue
        view = state.setdefault(msg["topic"], {})
        if op == "snap" and msg.get("full"):
            view.clear()
        for k, v in msg["items"].items():
            received += 1
            if v is None:
                view.pop(k, None)
            else:
                view[k] = v
                if isinstance(v, dict) and isinstance(v.get("ts"), int | float):
                    last_latency_ms = time.time() * 1000 - v["ts"]
        if not tty:
            for k, v in msg["items"].items():
                print(f"{msg['topic']} {k} {json.dumps(v, default=repr)}", flush=True)
        elif loop.time() - last_draw > 0.25:
            last_draw = loop.time()
            _draw(state, url, received, last_latency_ms)
    conn.close()
    return codes.EXIT_OK


def _draw(
    state: dict[str, dict[str, Any]], url: str, received: int, latency_ms: float | None
) -> None:
    cols, rows = shutil.get_terminal_size((100, 30))
    lines = [
        f"fanout watch {url}   updates received: {received}"
        + (f"   latency of last: {latency_ms:.1f} ms" if latency_ms is not None else "")
    ]
    for topic, view in state.items():
        lines.append(f"── {topic} ({len(view)} keys)")
        for k in sorted(view)[: max(1, rows - 4 - len(state) * 2)]:
            v = view[k]
            shown = v.get("px", v) if isinstance(v, dict) else v
            lines.append(f"  {k:<12} {json.dumps(shown, default=repr)[: cols - 16]}")
    sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines[: rows - 1]) + "\n")
    sys.stdout.flush()


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
