"""The admin HTTP process: health, readiness, statistics and publishing over HTTP.

`engine.admin.http` decides every answer (pure); `engine.admin.server` serves it
(`run_admin` is the process entry point, `serve_admin` starts it in a running loop).
"""
