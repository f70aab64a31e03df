"""The supervisor: the arbiter that forks and watches every process, its pre-flight
checks, the retry backoff, and the status board.

Nothing in this package may import asyncio: the supervisor runs no event loop.
"""
