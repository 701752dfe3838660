"""A loopback TCP server with a thread per connection, for the scripted mail and directory
servers tests put behind a running gateway (each answers in its own way: ``_serve``)."""
from __future__ import annotations

import socket
import threading


class ThreadServer:
    """Listens on 127.0.0.1 (``port``) from construction; ``_serve(conn, n)`` runs in a thread
    per accepted connection (``n``: its number from 1, also ``connections``). A subclass sets
    its own attributes before calling ``__init__``: connections may come at once."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                # closed
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        raise NotImplementedError

    def close(self):
        self.sock.close()
