#!/usr/bin/env bash
# careflow-check.sh — prove what careflow promises, end to end on this machine: one line per
# stage, PASS, FAIL or SKIP (with why) and its time; exit 0 when nothing failed, else exit 1 and
# a last line naming the stage that failed.
#
#   ./careflow-check.sh                   # a throw-away installation: its own hub, embedded
#                                         # broker, data directory, ports and HTTP receiver
#   ./careflow-check.sh --require-influx  # the dashboards stage FAILs instead of SKIPping
#   ./careflow-check.sh --live            # against the configured running installation:
#                                         # read-only health, then a synthetic gateway check-*
#   CAREFLOW_BIN=/opt/careflow/bin/careflow ./careflow-check.sh
#   CAREFLOW_CHECK_INFLUXD=/opt/influxdb/influxd ./careflow-check.sh   # influxd not on PATH
#
# Stages (throw-away installation): the hub starts; a gateway agent connects; readings and a
# care alarm go through its spool and are stored once each; the hub confirms them; no gaps or
# dead letters; alerts route (the check gateway's alarm to channel `check`, another gateway's
# outage to `oncall`, a local HTTP receiver as json:// channels); the synthetic events appear in
# the Grafana dashboards' own panel queries (InfluxDB: `influxd` on PATH, started here, or
# CAREFLOW_INFLUX_URL, a scratch database dropped after; SKIP without either); provisioning
# (register → claim → active); a runbook dry run (`careflow agent propose` for the check
# gateway's error burst proposes an action, which nothing runs; SKIP until the agent is
# installed).
#
# --live never changes the installation beyond the synthetic gateway: check-health.sh, then a
# gateway `check-<host>-<pid>` publishes a heartbeat and a care alarm (raised, then cleared) with
# the CLI's broker settings. The shipped rules route gateway `check-*` to channel `check` with
# no escalation (rules/default.yaml), so it never pages on-call; the stage fails if any
# notification of it went elsewhere. The gateway is paused for a day after, so its silence is
# no incident either.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")"
live=0 require_influx=0
for arg in "$@"; do
    case $arg in
        --live) live=1 ;;
        --require-influx) require_influx=1 ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
bin=${CAREFLOW_BIN:-$( [[ -x .venv/bin/careflow ]] && echo .venv/bin/careflow || command -v careflow || true)}
[[ -n $bin ]] || { echo "FAIL: no careflow command (pip install -e . first)"; exit 1; }
py=$(dirname "$bin")/python
[[ -x $py ]] || py=python3

work=$(mktemp -d -t careflow-check-XXXXXX)
pids=() passed=() skipped=()
influx_drop=""
cleanup() {
    [[ -z $influx_drop ]] || "$py" - "$influx_drop" <<'EOF' >/dev/null 2>&1 || true
import sys, urllib.parse, urllib.request
url, db = sys.argv[1].rsplit(" ", 1)
urllib.request.urlopen(url + "/query", data=urllib.parse.urlencode({"q": f'DROP DATABASE "{db}"'}).encode(), timeout=5)
EOF
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
hub_pid=""  # the throw-away hub, once started: a wait gives up as soon as it has exited
hub_gone() { [[ -n $hub_pid ]] && ! kill -0 "$hub_pid" 2>/dev/null; }
wait_for() {  # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) && ! hub_gone || return 1; sleep 0.2; done
}
json_field() { "$py" -c 'import json,sys; r=json.loads(sys.stdin.readline()); print(r.get(sys.argv[1]))' "$1"; }

# run_stage NAME FUNCTION: the function prints what it saw as its last line and returns 0
# (PASS), 77 (SKIP) or anything else (FAIL: the run stops here).
run_stage() {
    local name=$1 start rc=0 detail ms
    start=$(date +%s%N)
    "$2" >"$work/stage.out" 2>&1 || rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    detail=$(tail -n 1 "$work/stage.out")
    case $rc in
        0) printf 'PASS  %-30s %7d ms  %s\n' "$name" "$ms" "$detail"; passed+=("$name") ;;
        77) printf 'SKIP  %-30s %7d ms  %s\n' "$name" "$ms" "$detail"; skipped+=("$name") ;;
        *) ! hub_gone || detail+=" (the hub, pid $hub_pid, has exited)"
           printf 'FAIL  %-30s %7d ms  %s\n' "$name" "$ms" "$detail"
           [[ ! -s $work/hub.log ]] || echo "  hub log: $(tail -n 3 "$work/hub.log" | tr '\n' ' ' | cut -c1-400)"
           [[ ! -s $work/agent.log ]] || echo "  agent log: $(tail -n 3 "$work/agent.log" | tr '\n' ' ' | cut -c1-400)"
           echo "FAIL: $name: $detail"
           exit 1 ;;
    esac
}

# -- --live: the running installation ---------------------------------------------------------

live_health() {
    CAREFLOW=$bin bash scripts/check-health.sh >"$work/health.out" 2>&1 || {
        cat "$work/health.out"; tail -n 1 "$work/health.out"; return 1; }
    echo "scripts/check-health.sh: $(grep -c '^PASS ' "$work/health.out") checks passed, $(grep -c '^SKIP ' "$work/health.out") skipped"
}

live_gateway() {
    local gw="check-$(hostname -s | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | cut -c1-20)-$$" notes
    gw=${gw//--/-}
    care_alarm() {  # care_alarm STATE: the synthetic gateway's care-alarm incident is in STATE
        "$bin" incidents list --state "$1" --json 2>/dev/null | grep "\"$gw\"" | grep -q care-alarm; }
    "$bin" events publish --gateway "$gw" --type heartbeat --data '{"interval_s": 3600}' >/dev/null || {
        echo "could not publish as $gw (careflow events publish; CAREFLOW_BROKER_URL and credentials)"; return 1; }
    wait_for 30 "$bin" devices show "$gw" || { echo "$gw's heartbeat was not stored within 30 s (careflow status)"; return 1; }
    "$bin" events publish --gateway "$gw" --device check-sos --type alert --data '{"kind": "sos", "state": "raised"}' >/dev/null
    wait_for 30 care_alarm active || { echo "no care-alarm incident for $gw within 30 s (careflow incidents list)"; return 1; }
    "$bin" events publish --gateway "$gw" --device check-sos --type alert --data '{"kind": "sos", "state": "cleared"}' >/dev/null
    wait_for 30 care_alarm resolved || { echo "the care alarm of $gw was not resolved by its clear within 30 s"; return 1; }
    "$bin" devices pause "$gw" --for 24h --reason "careflow-check.sh --live synthetic gateway" >/dev/null 2>&1 || true
    sleep 1
    notes=$("$bin" notify list --json 2>/dev/null | grep -F "$gw" || true)
    if grep -v '"channel":"check"' <<<"$notes" | grep -q '"channel"'; then
        echo "a notification of $gw went to another channel than check: $(grep -v '"channel":"check"' <<<"$notes" | head -n 1 | cut -c1-200)"
        return 1
    fi
    echo "$gw: care alarm raised and cleared, incident recorded, announced only on channel check ($(grep -c . <<<"$notes" || true) notifications)"
}

if ((live)); then
    echo "careflow-check.sh --live: the installation at ${CAREFLOW_DATA_DIR:-the default data directory}"
    run_stage "health (read-only)" live_health
    run_stage "synthetic gateway check-*" live_gateway
    echo "PASS: ${#passed[@]} stages passed: the running installation is healthy and its synthetic gateway routes to check"
    exit 0
fi

# -- a throw-away installation ----------------------------------------------------------------

port=$(free_port) http_port=$(free_port) receiver_port=$(free_port)
unset CAREFLOW_BROKER_URL CAREFLOW_PKI_DIR CAREFLOW_RULES_DIR CAREFLOW_INFLUX_DB CAREFLOW_INFLUX_BUCKET \
    CAREFLOW_INFLUX_ORG CAREFLOW_INFLUX_TOKEN CAREFLOW_INFLUX_TOKEN_FILE CAREFLOW_RUNBOOKS_DIR
for var in $(compgen -e | grep '^CAREFLOW_CHANNEL_' || true); do unset "$var"; done
export CAREFLOW_DATA_DIR=$work/hub CAREFLOW_LISTEN=127.0.0.1:$port CAREFLOW_HTTP_LISTEN=127.0.0.1:$http_port
export CAREFLOW_AUTOMATION=manual  # the agent proposes, nothing runs: a dry run
export CAREFLOW_CHANNEL_ONCALL=json://127.0.0.1:$receiver_port/oncall \
    CAREFLOW_CHANNEL_OPS=json://127.0.0.1:$receiver_port/ops \
    CAREFLOW_CHANNEL_CHECK=json://127.0.0.1:$receiver_port/check
received=$work/received.jsonl

start_receiver() {
    "$py" - "$receiver_port" "$received" <<'EOF' &
import http.server, json, sys
port, out = int(sys.argv[1]), sys.argv[2]
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body.decode(errors="replace")}) + "\n")
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Receiver).serve_forever()
EOF
    pids+=($!)
}

influx_url="" influx_db=careflow
influxd_bin=${CAREFLOW_CHECK_INFLUXD:-$(command -v influxd || echo /usr/bin/influxd)}
start_influx() {
    if [[ -n ${CAREFLOW_INFLUX_URL:-} ]]; then
        influx_url=$CAREFLOW_INFLUX_URL influx_db=careflow_check_$$
        influx_drop="$influx_url $influx_db"
    elif [[ -n ${CAREFLOW_CHECK_INFLUXD:-} && ! -x $influxd_bin ]]; then
        echo "CAREFLOW_CHECK_INFLUXD=$influxd_bin is not an executable influxd"; return 1
    elif [[ -x $influxd_bin ]]; then
        local ip bind
        ip=$(free_port) bind=$(free_port)
        mkdir -p "$work/influxd"
        cat >"$work/influxd/influxdb.conf" <<EOF
reporting-enabled = false
bind-address = "127.0.0.1:$bind"
[meta]
  dir = "$work/influxd/meta"
[data]
  dir = "$work/influxd/data"
  wal-dir = "$work/influxd/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:$ip"
  log-enabled = false
[continuous_queries]
  enabled = false
EOF
        "$influxd_bin" -config "$work/influxd/influxdb.conf" >"$work/influxd/log" 2>&1 & pids+=($!)
        influx_url=http://127.0.0.1:$ip
        wait_for 30 "$py" -c "import urllib.request; urllib.request.urlopen('$influx_url/ping', timeout=1)" || {
            echo "influxd did not answer /ping within 30 s: $(tail -n 2 "$work/influxd/log")"; return 1; }
    fi
    if [[ -n $influx_url ]]; then
        export CAREFLOW_INFLUX_URL=$influx_url CAREFLOW_INFLUX_DB=$influx_db
    fi
}

stage_hub() {
    start_receiver
    start_influx || return 1
    "$bin" hub >"$work/hub.log" 2>&1 & pids+=($!)
    hub_pid=$!
    wait_for 30 "$bin" status || { echo "the hub did not report healthy within 30 s (careflow status)"; return 1; }
    echo "embedded broker on 127.0.0.1:$port, web on :$http_port, time series ${influx_url:-off} (hub pid $hub_pid)"
}

stage_gateway() {
    "$bin" edge run --gateway check-gw --broker "mqtt://127.0.0.1:$port" --data-dir "$work/edge" \
        --heartbeat-interval 5 >"$work/agent.log" 2>&1 & pids+=($!)
    online() { "$bin" devices show check-gw --json | grep -q '"state":"online"'; }
    wait_for 20 online || { echo "the gateway's heartbeat or presence did not reach the hub within 20 s"; return 1; }
    echo "check-gw online (heartbeat and retained presence)"
}

stage_readings() {
    mkdir -p "$work/edge/spool"
    for i in $(seq 1 50); do
        echo "{\"device\": \"check-sensor-$((i % 5))\", \"type\": \"status\", \"data\": {\"state\": \"ok\", \"battery_pct\": 80}}"
    done >"$work/edge/spool/check.tmp"
    echo '{"device": "check-fall", "type": "alert", "data": {"kind": "fall", "state": "raised"}}' >>"$work/edge/spool/check.tmp"
    for i in $(seq 1 11); do  # an error burst (more than 10 in 5 min): the runbook stage's incident
        echo "{\"device\": \"check-err\", \"type\": \"error\", \"data\": {\"code\": \"E_CHECK\", \"message\": \"synthetic error $i\", \"severity\": \"warning\"}}"
    done >>"$work/edge/spool/check.tmp"
    mv "$work/edge/spool/check.tmp" "$work/edge/spool/check.jsonl"
    stored() { [[ $("$bin" events count --gateway check-gw --type status) == 50 && $("$bin" events count --type alert) == 1 \
        && $("$bin" events count --type error) == 11 ]]; }
    wait_for 30 stored || { echo "readings were not stored once each (careflow events count)"; return 1; }
    echo "50 readings, 11 errors and a care alarm through the spool, stored once each"
}

stage_confirmed() {
    drained() { "$bin" gateway cmd check-gw diagnostics --broker "mqtt://127.0.0.1:$port" --timeout 3 | grep -q '"outbox_waiting": 0'; }
    wait_for 30 drained || { echo "the gateway still holds unconfirmed events (careflow gateway cmd check-gw diagnostics)"; return 1; }
    echo "the gateway's outbox is empty: every event confirmed"
}

stage_clean() {
    local gaps
    gaps=$("$bin" status --json | "$py" -c 'import json,sys; r=json.load(sys.stdin); print(r["sequence_gaps"], r["dead_letters_kept"])') || {
        echo "careflow status failed: the hub is down"; return 1; }
    [[ $gaps == "0 0" ]] || { echo "gaps and dead letters: $gaps (careflow status; careflow deadletter list)"; return 1; }
    echo "no sequence gaps, no dead letters"
}

stage_alerts() {
    # the check gateway's care alarm: the shipped route sends check-* to channel check only
    to() { "$py" -c 'import json,sys; print(sum(1 for l in open(sys.argv[1]) if json.loads(l)["path"].startswith(sys.argv[2]) and sys.argv[3] in json.loads(l)["body"]))' "$received" "$1" "$2" 2>/dev/null || echo 0; }
    arrived() { [[ $(to "$1" "$2") -ge 1 ]]; }
    wait_for 30 arrived /check check-gw || { echo "the care alarm of check-gw did not reach channel check (careflow notify list)"; return 1; }
    # another gateway goes silent (1 s heartbeats): gateway-offline, critical, pages oncall
    "$bin" events publish --gateway gw-check-route --type heartbeat --data '{"interval_s": 1}' >/dev/null || {
        echo "careflow events publish failed: the broker is down"; return 1; }
    wait_for 45 arrived /oncall gw-check-route || { echo "gw-check-route's outage did not reach channel oncall (careflow incidents list; careflow notify list)"; return 1; }
    [[ $(to /oncall check-gw) == 0 ]] || { echo "check-gw's alarm paged oncall: the route for check-* is missing (rules/default.yaml)"; return 1; }
    echo "care alarm of check-gw → check only; outage of gw-check-route → oncall"
}

stage_dashboards() {
    if [[ -z $influx_url ]]; then
        echo "no InfluxDB (install influxd, or set CAREFLOW_INFLUX_URL)"
        ((require_influx)) && return 1
        return 77
    fi
    sunk() { [[ $("$bin" status --json | json_field influx_backlog_events) == 0 ]]; }
    wait_for 30 sunk || { echo "the sink did not catch up with InfluxDB within 30 s (careflow status: influx_*)"; return 1; }
    "$py" - "$influx_url" "$influx_db" grafana/dashboards/*.json <<'EOF'
import json, sys, time, urllib.parse, urllib.request
url, db, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
now = int(time.time() * 1000)
def query(q):
    body = urllib.parse.urlencode({"q": q, "db": db, "epoch": "ms"}).encode()
    with urllib.request.urlopen(url + "/query", data=body, timeout=10) as answer:
        result = json.loads(answer.read())["results"][0]
    if "error" in result:
        raise SystemExit(f"InfluxQL error {result['error']!r} for {q!r}")
    return result.get("series", [])
ran = with_check_gw = 0
found = set()
for path in paths:
    dashboard = json.load(open(path))
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            q = (target["query"].replace("$timeFilter", f"time >= {now - 3600_000}ms and time <= {now + 60_000}ms")
                 .replace("$__interval", "1m").replace("$site", ".*").replace("$gateway", ".*"))
            series = query(q)
            ran += 1
            if "check-gw" in json.dumps(series):
                with_check_gw += 1
                found.add(panel["title"])
if not with_check_gw:
    raise SystemExit(f"none of the {ran} panel queries shows check-gw's events")
print(f"{ran} panel queries ran; {with_check_gw} show check-gw, e.g. {', '.join(sorted(found)[:3])}")
EOF
}

stage_provisioning() {
    local registered token
    registered=$("$bin" provision register --serial CHECK-SN-$$ --site check-site --ttl 10m --json) || {
        echo "careflow provision register failed"; return 1; }
    token=$(json_field token <<<"$registered")
    "$bin" edge claim --serial "CHECK-SN-$$" --token "$token" --broker "mqtt://127.0.0.1:$port" \
        --out "$work/claimed" --timeout 30 --run >"$work/claim.log" 2>&1 & pids+=($!)
    "$bin" provision watch "CHECK-SN-$$" --timeout 60 >"$work/watch.log" 2>&1 || {
        echo "CHECK-SN-$$ did not become active: $(tail -n 2 "$work/watch.log" "$work/claim.log" | tr '\n' ' ' | cut -c1-300)"; return 1; }
    echo "CHECK-SN-$$ registered → claimed → active as $(json_field gateway_id <<<"$registered")"
}

stage_runbook() {
    if ! "$bin" agent --help >/dev/null 2>&1; then
        echo "careflow agent is not installed in this version: no runbook dry run"
        return 77
    fi
    local incident
    incident=$("$bin" incidents list --json | "$py" -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line)
    if r.get("gateway") == "check-gw" and r.get("rule") == "error-burst":
        print(r["id"]); break')
    [[ -n $incident ]] || { echo "no error-burst incident of check-gw to propose for (careflow incidents list)"; return 1; }
    "$bin" agent propose "$incident" --json >"$work/proposal.json" 2>"$work/proposal.err" || {
        echo "careflow agent propose $incident failed: $(tail -n 1 "$work/proposal.err")"; return 1; }
    "$py" - "$work/proposal.json" "$incident" <<'EOF'
import json, sys
made = json.loads(open(sys.argv[1]).readline())
proposal = made.get("proposal")
if not proposal or not proposal.get("action"):
    raise SystemExit(f"no action proposed for incident {sys.argv[2]}: {made.get('note')}")
print(f"incident {sys.argv[2]} (error-burst of check-gw): proposal {proposal.get('id')}, "
      f"{proposal['action']} {json.dumps(proposal.get('params'), sort_keys=True)}, "
      f"{proposal.get('state')}; nothing runs without approval")
EOF
}

echo "careflow-check.sh: a throw-away installation in $work"
run_stage "hub starts" stage_hub
run_stage "gateway online" stage_gateway
run_stage "readings stored once" stage_readings
run_stage "confirmed to the gateway" stage_confirmed
run_stage "no gaps, no dead letters" stage_clean
run_stage "alerts route" stage_alerts
run_stage "dashboards' queries" stage_dashboards
run_stage "provisioning" stage_provisioning
run_stage "runbook dry run" stage_runbook
echo "PASS: ${#passed[@]} stages passed, ${#skipped[@]} skipped${skipped[*]:+ (${skipped[*]})}: careflow works on this machine"
