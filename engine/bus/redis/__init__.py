"""The redis bus' parts, one job per module (`RedisBus` in engine/bus/redis_streams.py runs them)."""
