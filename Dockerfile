# fanout container image: `fanout serve` under tini, as a non-root user.
#
#   docker build -t fanout:0.1.0 .
#   docker run --rm -p 8000:8000 -p 8001:8001 fanout:0.1.0 --demo
#
# Settings come from /etc/fanout/config.toml (a copy of the repository's
# config.toml, every setting at its default; Kubernetes mounts a ConfigMap over
# it) and from FANOUT_<SECTION>_<KEY> environment variables. Arguments after
# the image name are `fanout serve` flags. tests/unit/test_deploy.py lints this
# file with hadolint and checks its structure.

# Pinned to a patch release of Debian bookworm's slim image; pin the digest too
# (python:3.11.13-slim-bookworm@sha256:...) in the registry you build from.
FROM python:3.11.13-slim-bookworm

# tini is PID 1: it forwards SIGTERM to the supervisor (which drains) and reaps
# any orphan; fanout's supervisor only reaps its own children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when
# pyproject.toml changes, not on every code change. The list is read from
# pyproject.toml itself, so it cannot drift from what `pip install .` wants.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt

# Then the code, installed without touching the dependency layer.
COPY README.md ./
COPY engine engine
COPY workers workers
COPY loadtest loadtest
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info /root/.cache \
    && groupadd --system --gid 10001 fanout \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fanout

COPY config.toml /etc/fanout/config.toml

# Inside a container the admin port must be reachable from outside the
# container's loopback (probes, Prometheus): keep it off the public network
# with a Service/NetworkPolicy (docs/kubernetes.md). Bound beyond loopback, the
# engine refuses every POST (/publish, /rebalance) with 403 until FANOUT_API_KEY
# is set, and logs a warning at start saying so; reads (probes, /stats,
# /metrics) answer only Host headers that are IP addresses, localhost or
# server.admin_allowed_hosts.
ENV FANOUT_CONFIG=/etc/fanout/config.toml \
    FANOUT_SERVER_ADMIN_HOST=0.0.0.0

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# server.port (WebSocket) and server.admin_port (admin HTTP) of config.toml.
EXPOSE 8000 8001

# SIGTERM is fanout's graceful drain (bye + close 1001 spread over
# workers.drain_s, within workers.graceful_timeout_s).
STOPSIGNAL SIGTERM

# /healthz answers 200 while the supervisor runs. No curl in the slim image:
# python's urllib (any non-2xx or connection error exits non-zero).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FANOUT_SERVER_ADMIN_PORT', '8001'), timeout=2)"]

ENTRYPOINT ["/usr/bin/tini", "--", "fanout", "serve"]
