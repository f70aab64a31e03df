"""Logging setup shared by every process: readable text or one JSON object per line.

No payloads or tokens are ever logged: log calls pass counts, codes and names only.
A password inside a URL never reaches the log either: `RedactFilter` rewrites
`scheme://user:password@host` and `?password=` in every record's message to
`***` (the Redis bus already logs its URL redacted; this catches the rest,
e.g. a library's error text).

Repeated warnings and errors are rate-limited (`RepeatLimiter`): at most
`REPEAT_BURST` records of the same message template from the same logger per
`REPEAT_WINDOW_S`; the first record let through after a suppression says how
many were dropped. A reconnect loop or a bug hit by every request cannot flood
the log (or the disk under it); counters in /metrics still count every event.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

REPEAT_BURST = 5
REPEAT_WINDOW_S = 10.0
REPEAT_MAX_KEYS = 1024  # distinct templates tracked; beyond it the oldest window is forgotten


class RepeatLimiter:
    """Admit at most `burst` events per key per `window_s`. PURE: time is passed in.

    `admit(key, now)` returns None when the event must be dropped, else the
    number of events of that key dropped since the last one admitted (0 usually).
    Memory: at most `max_keys` keys (the oldest is evicted first).
    """

    def __init__(
        self,
        burst: int = REPEAT_BURST,
        window_s: float = REPEAT_WINDOW_S,
        max_keys: int = REPEAT_MAX_KEYS,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        # key -> [window start, admitted in window, dropped since last admitted]
        self._state: dict[object, list[float]] = {}

    def admit(self, key: object, now: float) -> int | None:
        st = self._state.get(key)
        if st is None:
            if len(self._state) >= self.max_keys:
                del self._state[next(iter(self._state))]
            self._state[key] = [now, 1, 0]
            return 0
        if now - st[0] >= self.window_s:
            st[0], st[1] = now, 0
        if st[1] >= self.burst:
            st[2] += 1
            return None
        st[1] += 1
        dropped, st[2] = int(st[2]), 0
        return dropped


class RepeatFilter(logging.Filter):
    """The logging shell of `RepeatLimiter`, for records at WARNING and above."""

    def __init__(self, limiter: RepeatLimiter | None = None) -> None:
        super().__init__()
        self.limiter = limiter or RepeatLimiter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        dropped = self.limiter.admit((record.name, record.msg), record.created)
        if dropped is None:
            return False
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it, not logged)"
        return True


# scheme://user:password@ (the password up to the last "@" before a "/" or a
# space, so a raw "@" in it is covered) and a password= query parameter.
_URL_PASSWORD_RE = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/]+@", re.IGNORECASE)
_PASSWORD_PARAM_RE = re.compile(r"([?&]password=)[^&#\s]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with every password of a URL in it replaced by `***`. PURE."""
    if "://" not in text and "password=" not in text.lower():
        return text
    text = _URL_PASSWORD_RE.sub(r"\1***@", text)
    return _PASSWORD_PARAM_RE.sub(r"\1***", text)


class RedactFilter(logging.Filter):
    """Rewrites a record's message when it holds a URL password (`redact_text`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "proc": self.process_name,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str, process_name: str) -> None:
    """Configure the root logger for this process (call again after fork)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        f = logging.Formatter(
            f"%(asctime)s %(levelname)-7s [{process_name} %(process)d] %(message)s",
            datefmt="%H:%M:%S",
        )
        f.converter = time.localtime
        handler.setFormatter(f)
    handler.addFilter(RepeatFilter())
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # picows logs every connect/disconnect at INFO (field notes): keep it quiet.
    logging.getLogger("picows").setLevel(max(logging.WARNING, root.level))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
