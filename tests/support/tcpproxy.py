"""A TCP fault proxy for tests: forwards 127.0.0.1:`port` to a target, and can
stall (stop forwarding in both directions, connections kept open: what a
black-holed network path looks like) and resume. Runs in its own thread."""

from __future__ import annotations

import selectors
import socket
import threading

from tests.support.serve import free_port


class StallProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, daemon=True, name="stall-proxy")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> StallProxy:
        self._thread.start()
        return self

    def stall(self) -> None:
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        try:
                            client, _ = self._listener.accept()
                            upstream = socket.create_connection(("127.0.0.1", self.target_port))
                        except OSError:
                            continue
                        for s in (client, upstream):
                            s.setblocking(True)
                        peers[client], peers[upstream] = upstream, client
                        sel.register(client, selectors.EVENT_READ, None)
                        sel.register(upstream, selectors.EVENT_READ, None)
                        continue
                    if self.stalled.is_set():
                        continue  # leave the bytes in the kernel: nothing moves
                    other = peers.get(sock)
                    try:
                        data = sock.recv(65536)
                        if data and other is not None:
                            other.sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        for s in (sock, other):
                            if s is not None and s in peers:
                                sel.unregister(s)
                                peers.pop(s, None)
                                s.close()
                if self.stalled.is_set():
                    self._stop.wait(0.01)  # readable sockets would spin select()
        finally:
            for s in list(peers):
                s.close()
            sel.close()
