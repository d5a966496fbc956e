# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .uv/bin/uv
VENV := .venv
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

.PHONY: install run test lint typecheck fmt lock bench bench-scale loadtest clean

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# Installs exactly the hashed versions in requirements.lock, then this project (editable).
# requirements.lock is what containers install; requirements-dev.lock adds the test and lint tools.
$(VENV)/.installed: requirements-dev.lock pyproject.toml | $(UV)
	test -x $(VENV)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --require-hashes requirements-dev.lock
	$(UV) pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Regenerate the lock after editing dependencies in pyproject.toml.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --universal --generate-hashes \
		--no-header --no-annotate -o requirements.lock
	$(UV) pip compile pyproject.toml --group dev --universal --generate-hashes \
		--no-header --no-annotate -o requirements-dev.lock

run: install
	$(VENV)/bin/voicerelay up

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# Relay CPU per call-minute, added latency and memory per call at 50 and 100 concurrent calls,
# for voicerelay with 1 and 3 replicas next to a plain `websockets` relay (the floor), and phone
# calls' Twilio start -> first agent audio, in one run (about 5 minutes; not a test).
# Extra flags: make bench BENCH_ARGS="--calls 20 --replicas 1 --seconds 10".
bench: install
	$(VENV)/bin/python -m loadtests.bench_relay $(BENCH_ARGS)

# Relay CPU per call-minute, summed over replicas and per replica, with the same 48 calls spread
# over 1, 2, 3, 4 and 8 replicas, for the targeted client manager, python-socketio's stock
# AsyncRedisManager and N plain-websockets floor relays, in one run (about 7 minutes; not a test).
# Extra flags: make bench-scale BENCH_ARGS="--replicas 1 --replicas 3 --seconds 10".
bench-scale: install
	$(VENV)/bin/python -m loadtests.bench_scale $(BENCH_ARGS)

# Locust, headless and bounded (6 users for 60 s, then running calls finish), against the stack
# `make run` is running, or one it starts on loopback and stops afterwards; CSV and HTML report in
# .voicerelay/loadtest/ (about 2 minutes; not a test). Real deployments: loadtests/README.md.
# Extra flags: make loadtest LOADTEST_ARGS="--users 20 --run-time 5m".
loadtest: install
	$(VENV)/bin/python -m loadtests.run_local $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .uv .pytest_cache .mypy_cache .ruff_cache
