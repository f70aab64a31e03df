# The two commands of the README's quick start:
#   make run    install, then run the engine with the demo feed (embedded bus, no Redis)
#   make test   install everything the tests need (redis-server included), then run them all
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test check lint typecheck unit fuzz bench-first bench bench-targets install system-deps interop-deps clean screenshot

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Node's `ws` for tests/interop (an independent client stack), pinned by its lockfile.
INTEROP := tests/interop
$(INTEROP)/node_modules/.installed: $(INTEROP)/package.json $(INTEROP)/package-lock.json
	cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

interop-deps: system-deps $(INTEROP)/node_modules/.installed

# Debian packages the tests use (real redis-server: no mocks stand in for Redis;
# chromium for the browser tests).
system-deps:
	@command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || { \
	  echo "installing redis-server and redis-cli (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; }
	@# headless Chromium for the browser tests (tests/e2e), driven by Playwright's Python
	@# package with this system browser: `playwright install` is never needed.
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@# node and npm: the browser client's tests (tests/js) and Node's `ws` (tests/interop)
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@# promtool (checks /metrics and deploy/kubernetes/monitoring's rules): taken out of
	@# Debian's `prometheus` package alone, since installing the package would also start
	@# a Prometheus server (its init script) and pull in its web UI's JavaScript.
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (from Debian's prometheus package)"; \
	  apt-get update -qq && tmp=$$(mktemp -d) && chmod 755 "$$tmp" && \
	  (cd "$$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) && \
	  dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool && \
	  chmod 755 /usr/local/bin/promtool && rm -rf "$$tmp"; }

run: $(STAMP)
	$(BIN)/fanout serve --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/property

# Everything: lint, types, every test layer.
test: $(STAMP) system-deps interop-deps lint typecheck
	$(BIN)/pytest -q

check: test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info $(INTEROP)/node_modules

# Long property-based fuzzing of the codec and core (many more examples).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q --timeout=0 tests/property

# The first measurement: 1,000 subscribers, 10,000 updates/s for 30 s, 2 workers (README, Benchmarks).
bench-first: $(STAMP)
	$(BIN)/fanout bench --preset first

# The hot-workload capacity comparison of docs/benchmarks.md: fanout next to the naive
# picows broadcaster, 1,000 subscribers, 10,000 updates/s, 60 s (reports/ gets JSON + Markdown).
bench: $(STAMP)
	-$(BIN)/fanout bench --workload hot -S 1000 -U 10000 -D 60 --baseline

# Every performance target of docs/benchmarks.md ("The targets, one by one"), one run
# each, reports in reports/targets-*.{json,md}; about 30 minutes (the soak alone is 10).
# A run that misses its target (exit 1) does not stop the others (make's `-`).
bench-targets: $(STAMP)
	-$(BIN)/fanout bench --workload hot -S 1000 -U 10000 -D 60 --baseline --name targets-hot
	-$(BIN)/fanout bench --workload market -S 1000 -U 20000 -D 60 --name targets-market-20k
	-$(BIN)/fanout bench --workload market -S 1000 -U 2000 -D 60 --baseline --name targets-market-2k
	-$(BIN)/fanout bench --workload market -S 10000 -U 5000 --max-hz 5 -D 60 --name targets-scale
	-$(BIN)/fanout bench --workload stream -S 1000 -U 100 -D 60 --baseline --name targets-stream
	-$(BIN)/fanout bench --idle -S 10000 -D 10 --baseline --name targets-idle
	-$(BIN)/fanout bench --workload market -S 1000 -U 1000 -D 600 --name targets-soak
	-$(BIN)/fanout bench --workload market --slow 0.1 -S 1000 -U 5000 -D 60 --name targets-slow
	-$(BIN)/fanout bench --storm -S 5000 -U 1000 -D 30 --name targets-storm

# Retake docs/dashboard.png (the live dashboard in headless Chromium).
screenshot: $(STAMP) system-deps
	$(BIN)/python -m tests.e2e.screenshot docs/dashboard.png
