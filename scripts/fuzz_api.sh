#!/usr/bin/env bash
# Schemathesis (every check) against the service's published OpenAPI schema, on loopback,
# with a bearer token. Usage: scripts/fuzz_api.sh [CONFIG.toml] [SECONDS]
# Needs a published refresh (after `make demo`, the demo's). Installs schemathesis into uv's
# tool cache on first use; nothing is added to the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-}
seconds=${2:-300}
port=$(.venv/bin/python -c "from sendtime.demo import free_port; print(free_port())")
token=$(.venv/bin/python -c "import secrets; print(secrets.token_hex(16))")
log=$(mktemp)
export SENDTIME_API_TOKEN=$token
setsid .venv/bin/sendtime ${config:+--config "$config"} serve --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill -- -"$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 1
done
python3 -m uv tool run --from "schemathesis==4.32.*" schemathesis run "http://127.0.0.1:$port/openapi.json" \
  -H "Authorization: Bearer $token" --checks all --workers 2 --max-time "$seconds"
echo "server log: $(wc -c <"$log") bytes ($(grep -c Traceback "$log" || true) tracebacks)"
