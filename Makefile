# `make demo` installs everything (uv, the locked environment in .venv) and runs the main
# job end to end; `make test` runs the tests. Both work on a fresh machine with python3.
PY ?= python3
UV := $(PY) -m uv
VENV := .venv
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install demo test lint bench bench-tools soak fuzz ui

# --compile-bytecode: every command would otherwise compile its ~3,000 imported modules
# again where bytecode is not written (PYTHONDONTWRITEBYTECODE, read-only installs): ~5 s each
$(VENV)/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install --quiet "uv>=0.5,<1"
	$(UV) sync --frozen --all-extras --compile-bytecode --python $(PY)
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sendtime demo

test: lint
	$(VENV)/bin/python -m pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install bench-tools
	$(VENV)/bin/python benchmarks/bench_pipeline.py --users 100000
	$(VENV)/bin/python benchmarks/bench_recommend.py
	$(VENV)/bin/python benchmarks/bench_load.py
	$(VENV)/bin/python benchmarks/bench_plan.py --users 1000000 --capacity-per-hour 40000

# wrk, the load generator of bench_load.py and soak.py (Debian package)
bench-tools:
	@command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))

# after `make demo`: 10 minutes at 80 % of the measured maximum rate with a live reload half way
soak: install bench-tools
	$(VENV)/bin/python benchmarks/soak.py --minutes 10

# after `make demo`: schemathesis with every check against the published OpenAPI schema
fuzz: install
	scripts/fuzz_api.sh "" 300

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000
