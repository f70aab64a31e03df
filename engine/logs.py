"""Logging setup shared by every process: readable text or one JSON object per line.

No payloads or tokens are ever logged: log calls pass counts, codes and names only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


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
    root.addHandler(handler)
    root.setLevel(level.upper())
    # picows logs every connect/disconnect at INFO (field notes): keep it quiet.
    logging.getLogger("picows").setLevel(max(logging.WARNING, root.level))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
