"""fanout: a multiprocess WebSocket broadcast engine for live state feeds."""

__version__ = "0.1.0"
