"""What runs inside one worker process: main, server (picows wiring), listener (one connection)."""
