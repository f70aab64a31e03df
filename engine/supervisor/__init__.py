"""The supervisor: the arbiter that forks and watches every process, and its
pre-flight checks. The retry backoff (engine.backoff) and the status board
(engine.board, engine.status) it uses are shared with the bus, the clients,
the workers and the admin, and live beside them.

Nothing in this package may import asyncio: the supervisor runs no event loop.
"""
