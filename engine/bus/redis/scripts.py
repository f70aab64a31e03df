"""The Lua scripts of the redis bus (`engine/bus/lua/`), loaded and called by SHA.

Rules:

1. Every script is read from the package once, when the client is built,
   and loaded into Redis (`SCRIPT LOAD`) at every sync, before anything else
   runs on the link: a Redis that restarted (and forgot its scripts) is
   always given them again before it is used.
2. A script Redis lost while the link stayed up (`SCRIPT FLUSH`) is loaded
   again and called once more (`call`) by the reads (epoch, history); the
   publish path never retries a publish (it could apply twice): its
   NOSCRIPT reply fails its requests `BusUnavailable` and makes the link
   resync (engine/bus/redis/publisher.py rule 5), which reloads them all.

The scripts: publish.lua (a shard's part of a publish, atomic), epoch.lua
(read or replace the epoch), history.lua (a stream topic's floor and events,
one atomic read), trim.lua (a byte trim of a shard's stream), expire.lua
(remove the idle topics of a shard).
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Final

from redis.exceptions import NoScriptError

NAMES: Final = ("publish", "epoch", "history", "trim", "expire")


def source(name: str) -> str:
    """The text of `engine/bus/lua/<name>.lua`."""
    return importlib.resources.files("engine.bus").joinpath("lua", f"{name}.lua").read_text("utf-8")


class Scripts:
    """The scripts' sources and, once loaded, their SHAs (empty before)."""

    __slots__ = ("_sources", "sha")

    def __init__(self) -> None:
        self._sources = {name: source(name) for name in NAMES}
        self.sha: dict[str, str] = dict.fromkeys(NAMES, "")

    async def load(self, cmd: Any) -> None:
        """Load every script into Redis through `cmd` (rule 1)."""
        for name in NAMES:
            self.sha[name] = await cmd.script_load(self._sources[name])

    async def call(self, cmd: Any, name: str, *args: Any) -> Any:
        """EVALSHA `name` with `args` (numkeys first); loaded again and called
        once more when Redis lost it (rule 2). Not for publish.lua."""
        try:
            return await cmd.evalsha(self.sha[name], *args)
        except NoScriptError:
            self.sha[name] = await cmd.script_load(self._sources[name])
            return await cmd.evalsha(self.sha[name], *args)
