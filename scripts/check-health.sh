#!/usr/bin/env bash
# Read-only health check of the configured careflow installation: one line per check
# (PASS, FAIL or SKIP with what it saw), then exit 0, or exit 1 naming the first failure.
# It changes nothing: it asks `careflow status --json`, `careflow incidents list --json`,
# `careflow devices list --json`, `careflow ca status --json` and the hub's /readyz, with the same settings as the CLI
# (CAREFLOW_DATA_DIR, CAREFLOW_PKI_DIR, CAREFLOW_HTTP_LISTEN, ...). Runbooks and monitors call it.
#
#   scripts/check-health.sh            # careflow on PATH (CAREFLOW=path/to/careflow otherwise)
#
# Thresholds (environment): CAREFLOW_CHECK_MAX_LAG_MS (60000: alert evaluation and commit lag),
# CAREFLOW_CHECK_MIN_FREE_PCT (10: free space where the data directory is),
# CAREFLOW_CHECK_MAX_SKEW_S (300: a source's clock against the hub's),
# CAREFLOW_CHECK_IGNORE_PREFIX (check-: gateways of careflow-check.sh --live are not the fleet).
set -o errexit -o pipefail -o nounset

careflow=${CAREFLOW:-careflow}
command -v "$careflow" >/dev/null || { echo "FAIL careflow: '$careflow' not found (set CAREFLOW=path/to/careflow)"; exit 1; }
py=$(dirname "$(command -v "$careflow")")/python
[[ -x $py ]] || py=python3
max_lag_ms=${CAREFLOW_CHECK_MAX_LAG_MS:-60000}
min_free_pct=${CAREFLOW_CHECK_MIN_FREE_PCT:-10}
max_skew_s=${CAREFLOW_CHECK_MAX_SKEW_S:-300}
ignore_prefix=${CAREFLOW_CHECK_IGNORE_PREFIX:-check-}

first_failure=""
report() {  # report PASS|FAIL|SKIP NAME DETAIL
    printf '%-4s %-14s %s\n' "$1" "$2" "$3"
    if [[ $1 == FAIL && -z $first_failure ]]; then first_failure="$2: $3"; fi
}
# judge NAME PYTHON-EXPRESSION-PRINTING "PASS|FAIL|SKIP detail" over the JSON on stdin (as `r`)
judge() {
    local name=$1 verdict
    verdict=$("$py" -c "import json, sys
r = json.loads(sys.stdin.read() or '{}')
$2" "${@:3}" 2>&1) || verdict="FAIL could not read the answer: ${verdict##*$'\n'}"
    report "${verdict%% *}" "$name" "${verdict#* }"
}

# the four questions at once (each is a Python start-up of its own), answers read in order below
answers=$(mktemp -d -t careflow-health-XXXXXX)
trap 'rm -rf "$answers"' EXIT
ask() {
    local name=$1; shift
    { local rc=0; "$careflow" "$@" >"$answers/$name" 2>"$answers/$name.err" || rc=$?; echo "$rc" >"$answers/$name.rc"; } &
}
ask status status --json
ask incidents incidents list --json --limit 1000
ask devices devices list --json
ask ca ca status --json
wait
lines_as_list() { "$py" -c 'import json, sys; print(json.dumps([json.loads(l) for l in sys.stdin if l.strip()]))'; }

status_json=$(cat "$answers/status")
[[ -n $status_json ]] || status_json='{}'

judge hub 'print("PASS running, reported " + r["reported"] if r.get("running") else
      "FAIL not running: no health report in the last 5 s (start it: systemctl start careflow-hub, or careflow hub)")' <<<"$status_json"
judge broker 'print("FAIL unknown: the hub is not running" if not r.get("running") else
      ("PASS connected to " + str(r.get("broker"))) if r.get("connected") else
      "FAIL not connected to the broker (check the broker and CAREFLOW_BROKER_URL)")' <<<"$status_json"

listen=${CAREFLOW_HTTP_LISTEN:-127.0.0.1:8080}
if [[ $listen == off ]]; then
    report SKIP web "CAREFLOW_HTTP_LISTEN=off"
    readyz='{}'
else
    host=${listen%:*} port=${listen##*:}
    [[ $host == 0.0.0.0 || $host == "[::]" || -z $host ]] && host=127.0.0.1
    readyz=$("$py" - "http://$host:$port/readyz" <<'EOF' 2>&1
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
        print(answer.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.read().decode())
except OSError as exc:
    print(json.dumps({"status": "unreachable", "error": str(exc)}))
EOF
    ) || readyz='{"status": "unreachable"}'
    judge web 'print("PASS /readyz ready" if r.get("status") == "ready" else
          "FAIL /readyz says " + json.dumps(r, sort_keys=True) + " (CAREFLOW_HTTP_LISTEN)")' <<<"$readyz"
fi

judge queue 'd, b = r.get("queue_depth"), r.get("queue_bound")
print("SKIP the hub is not running" if d is None or not r.get("running") else
      f"PASS {d} of {b} messages waiting" if d < 0.8 * b else
      f"FAIL {d} of {b} messages waiting: ingest is falling behind (hub log, disk, CPU)")' <<<"$status_json"
judge lag "a, c = r.get('alert_lag_ms'), r.get('commit_latency_ms')
print('SKIP the hub is not running' if a is None or not r.get('running') else
      f'PASS alert evaluation {a} ms behind, commits {c} ms' if a <= $max_lag_ms and (c or 0) <= $max_lag_ms else
      f'FAIL alert evaluation {a} ms behind, commits {c} ms (over $max_lag_ms ms; alerts_unrecorded: {r.get(\"alerts_unrecorded\")})')" <<<"$status_json"
judge store 'errors = r.get("store_errors") or 0
ready = json.loads(sys.argv[1]).get("checks", {}).get("store")
print("FAIL the store is not readable (CAREFLOW_DATA_DIR)" if "events_kept" not in r else
      "FAIL /readyz: store " + str(ready) if ready not in (None, "ok") else
      "FAIL %d store errors since start, last: %s" % (errors, r.get("last_error")) if errors else
      "PASS %(events_kept)d events kept, %(dead_letters_kept)d dead letters, %(sequence_gaps)d gaps" % r)' \
    "$readyz" <<<"$status_json"

# the data directory as the CLI resolves it (CAREFLOW_DATA_DIR, XDG_DATA_HOME, ~/.local/share)
data_dir=$("$py" -c 'import json, sys; print(json.loads(sys.stdin.read() or "{}").get("data_dir", ""))' <<<"$status_json")
if [[ -z $data_dir ]]; then
    report FAIL disk "no data directory: $(tail -n 1 "$answers/status.err")"
elif df_line=$(df -P "$data_dir" 2>/dev/null | tail -n 1); then
    read -r _ blocks _ avail _ mount <<<"$df_line"
    free_pct=$(( avail * 100 / (blocks > 0 ? blocks : 1) ))
    if (( free_pct >= min_free_pct )); then
        report PASS disk "$free_pct% free on $mount ($data_dir)"
    else
        report FAIL disk "$free_pct% free on $mount ($data_dir), under $min_free_pct%: free space before the store fails"
    fi
else
    report FAIL disk "no data directory at $data_dir (CAREFLOW_DATA_DIR)"
fi

judge influxdb 'print("SKIP time series off (CAREFLOW_INFLUX_URL unset)" if not any(k.startswith("influx_") for k in r) else
      "FAIL writes failing since " + str(r["influx_failing_since_ms"]) + ": " + str(r.get("influx_last_error")) + " (events wait in the log)" if r.get("influx_failing_since_ms") else
      "PASS " + str(r.get("influx_backlog_events", 0)) + " events waiting for InfluxDB")' <<<"$status_json"
incidents_json=null
[[ $(cat "$answers/incidents.rc") != 0 ]] || incidents_json=$(lines_as_list <"$answers/incidents") || incidents_json=null
# the hub's own alerts (careflow-hub): a channel whose latest attempt failed, and the rest
judge notifications 'f, w = r.get("notifications_failed"), r.get("notifications_waiting")
hub = json.loads(sys.argv[1]) or []
failing = [i for i in hub if i.get("gateway") == "careflow-hub" and i.get("rule") == "hub-notifications-failing"]
print("FAIL the outbox is not readable" if f is None else
      "FAIL notifications are failing: " + str(failing[0].get("summary") or failing[0].get("title")) + " (careflow notify list; careflow notify test CHANNEL)" if failing else
      "FAIL status digests cannot be queued since " + str(r["digests_failing_since_ms"]) if r.get("digests_failing_since_ms") else
      f"PASS no channel failing, {w} waiting, {f} failed in the outbox history")' "$incidents_json" <<<"$status_json"
judge self-alerts 'open_ = [i for i in (r or []) if i.get("gateway") == "careflow-hub"]
print("FAIL careflow incidents list failed" if r is None else
      "FAIL the hub alerts about itself: " + ", ".join(sorted({i["rule"] for i in open_})) + " (runbooks/hub-unhealthy.md)" if open_ else
      "PASS no open alert of the hub about itself")' <<<"$incidents_json"

devices_json=null
[[ $(cat "$answers/devices.rc") != 0 ]] || devices_json=$(lines_as_list <"$answers/devices") || devices_json=null
judge gateways "rows = r
ignore = '$ignore_prefix'
if rows is None:
    print('FAIL careflow devices list failed')
else:
    gws = [x for x in rows if x['device'] == x['gateway'] and not (ignore and x['gateway'].startswith(ignore))]
    bad = sorted(x['gateway'] + ' ' + x['state'] for x in gws if x['state'] in ('offline', 'late'))
    print(f'FAIL {len(bad)} of {len(gws)} gateways not online: ' + ', '.join(bad[:10]) if bad else
          f'PASS {len(gws)} gateways, none offline or late')" <<<"$devices_json"
judge clock "rows = r or []
bad = sorted(f\"{x['gateway']}/{x['device']} {x['clock_skew_s']}s\" for x in rows if abs(x.get('clock_skew_s') or 0) > $max_skew_s)
print(f'FAIL {len(bad)} sources more than ${max_skew_s}s off the hub clock (NTP): ' + ', '.join(bad[:10]) if bad else
      f'PASS no source more than ${max_skew_s}s off the hub clock')" <<<"$devices_json"

ca_rc=$(cat "$answers/ca.rc") ca_json=$(cat "$answers/ca")
case $ca_rc in
    0) report PASS ca "CAs, certificates and CRL valid for more than the warning window" ;;
    2) if [[ -n ${CAREFLOW_PKI_DIR:-} ]]; then
           report FAIL ca "no PKI at CAREFLOW_PKI_DIR=$CAREFLOW_PKI_DIR (careflow ca status)"
       else
           report SKIP ca "no PKI (CAREFLOW_PKI_DIR unset): the embedded broker's demo PKI, or careflow ca init not run"
       fi ;;
    *) judge ca 'print("FAIL needs action (careflow ca status; careflow ca crl-refresh): " + json.dumps(r)[:300])' \
           <<<"$(printf '%s' "$ca_json" | head -n 1)" ;;
esac

if [[ -n $first_failure ]]; then
    echo "FAIL: $first_failure"
    exit 1
fi
echo "PASS: every check"
