"""Load generators and benchmarks for fanout (run them with `python -m loadtest.<name>`)."""
