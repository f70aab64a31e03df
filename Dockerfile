# Minimal image; the operations issue completes it (tini, HEALTHCHECK, layers).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY workers workers
COPY loadtest loadtest
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home fanout
COPY config.toml ./

# probes reach the admin port from outside the container
ENV FANOUT_SERVER_ADMIN_HOST=0.0.0.0
USER fanout
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
ENTRYPOINT ["fanout", "serve"]
