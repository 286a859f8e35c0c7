#!/usr/bin/env bash
# careflow-check.sh — prove the whole pipeline end to end on this machine, in under a minute:
# gateway agent (spool input, outbox) → MQTT broker → hub (validate, dedupe, store) → confirmation
# back to the agent → registry and presence. Uses the embedded broker on a free port and a
# throw-away data directory, so it never touches a running installation.
#
#   ./careflow-check.sh            # uses .venv/bin/careflow if present, else careflow on PATH
#   CAREFLOW_BIN=/opt/careflow/bin/careflow ./careflow-check.sh
#
# Exit 0 and "PASS" when every step worked; otherwise "FAIL: <step>" and what to look at.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")"
bin=${CAREFLOW_BIN:-$( [[ -x .venv/bin/careflow ]] && echo .venv/bin/careflow || command -v careflow || true)}
[[ -n $bin ]] || { echo "FAIL: no careflow command (pip install -e . first)"; exit 1; }
py=$(dirname "$bin")/python
[[ -x $py ]] || py=python3

work=$(mktemp -d -t careflow-check-XXXXXX)
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CAREFLOW_DATA_DIR=$work/hub CAREFLOW_LISTEN=127.0.0.1:$port
unset CAREFLOW_BROKER_URL
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $1"; echo "  logs: hub $(tail -n 3 "$work/hub.log" 2>/dev/null | tr '\n' ' ')"; echo "        agent $(tail -n 3 "$work/agent.log" 2>/dev/null | tr '\n' ' ')"; exit 1; }
step() { printf '%-52s' "$1"; }
ok() { echo "ok ($(( ($(date +%s%N) - start) / 1000000 )) ms)"; }
wait_for() {  # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}

start=$(date +%s%N); step "hub with embedded broker on 127.0.0.1:$port"
"$bin" hub >"$work/hub.log" 2>&1 & pids+=($!)
wait_for 20 "$bin" status || fail "the hub did not report healthy (careflow status)"
ok

start=$(date +%s%N); step "gateway agent connects and announces itself online"
"$bin" edge run --gateway check-gw --broker "mqtt://127.0.0.1:$port" --data-dir "$work/edge" \
    --heartbeat-interval 5 >"$work/agent.log" 2>&1 & pids+=($!)
online() { "$bin" devices show check-gw --json | grep -q '"state":"online"'; }
wait_for 20 online || fail "the gateway's heartbeat or presence did not reach the hub"
ok

start=$(date +%s%N); step "50 sensor readings + a care alarm through the spool"
mkdir -p "$work/edge/spool"
for i in $(seq 1 50); do
    echo "{\"device\": \"check-sensor-$((i % 5))\", \"type\": \"status\", \"data\": {\"state\": \"ok\", \"battery_pct\": 80}}"
done >"$work/edge/spool/check.tmp"
echo '{"device": "check-fall", "type": "alert", "data": {"kind": "fall", "state": "raised"}}' >>"$work/edge/spool/check.tmp"
mv "$work/edge/spool/check.tmp" "$work/edge/spool/check.jsonl"
stored() { [[ $("$bin" events count --gateway check-gw --type status) == 50 && $("$bin" events count --type alert) == 1 ]]; }
wait_for 20 stored || fail "readings were not stored once each (careflow events count)"
ok

start=$(date +%s%N); step "the hub confirmed everything back to the gateway"
drained() { "$bin" gateway cmd check-gw diagnostics --broker "mqtt://127.0.0.1:$port" --timeout 3 | grep -q '"outbox_waiting": 0'; }
wait_for 20 drained || fail "the gateway still holds unconfirmed events (careflow gateway cmd check-gw diagnostics)"
ok

start=$(date +%s%N); step "no sequence gaps, no dead letters"
gaps=$("$bin" status --json | "$py" -c 'import json,sys; r=json.load(sys.stdin); print(r["sequence_gaps"], r["dead_letters_kept"])')
[[ $gaps == "0 0" ]] || fail "gaps and dead letters: $gaps (careflow status; careflow deadletter list)"
ok

echo "PASS: edge → broker → hub → store → confirmation works on this machine"
