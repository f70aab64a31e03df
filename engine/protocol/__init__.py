"""Protocol v1 (docs/protocol.md): messages and the msgpack codec. PURE: no I/O."""
