"""One real worker (`fanout serve --workers 1`, local bus) for the whole
conformance suite, reached over raw TCP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conformance.peer import Peer
from tests.support.serve import Served

# a 64-bit length (section 5.2) needs a message over 65,535 bytes
MAX_MESSAGE_BYTES = 200_000


@pytest.fixture(scope="package")  # stopped once the package's tests are done
def served(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1"],
        env={"FANOUT_LIMITS_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)},
        log_path=str(tmp_path_factory.mktemp("conformance") / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def peer(served: Served) -> Iterator[Peer]:
    p = Peer(served.port)
    try:
        yield p
    finally:
        p.close()
