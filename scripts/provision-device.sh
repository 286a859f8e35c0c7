#!/usr/bin/env bash
# Onboard one gateway, for the technician on site: register its serial on the hub, show the
# one-time token to type (or paste) into the gateway, then watch it claim, connect and send its
# first heartbeat. Exits 0 only when the gateway is active; otherwise says which step failed and
# what to check.
#
#   scripts/provision-device.sh SERIAL SITE [--gateway-id ID] [--ttl 2h] [--timeout 600] [--replace]
#
# Run it on the hub (it reads and writes the hub's database: CAREFLOW_DATA_DIR). On the gateway:
#   careflow-edge claim --serial SERIAL --token TOKEN --claim-cert claim.crt \
#       --claim-key claim.key --ca-file device-ca.crt --broker mqtts://HUB:8884 \
#       --out /var/lib/careflow-edge --run
set -o errexit -o pipefail -o nounset

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 64; }
[[ $# -ge 2 ]] || usage
serial=$1 site=$2
shift 2
gateway_args=() ttl=2h timeout=600 replace=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --gateway-id) gateway_args=(--gateway-id "$2"); shift 2 ;;
        --ttl) ttl=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --replace) replace=(--replace); shift ;;
        *) usage ;;
    esac
done
careflow=${CAREFLOW:-careflow}
command -v "$careflow" >/dev/null || { echo "FAIL: '$careflow' not found (set CAREFLOW=path/to/careflow)" >&2; exit 69; }

echo "1/3 registering $serial at $site"
if ! registered=$("$careflow" provision register --serial "$serial" --site "$site" \
        --ttl "$ttl" --json "${gateway_args[@]}" "${replace[@]}"); then
    echo "FAIL: the hub refused the registration (see the message above)" >&2
    exit 1
fi
field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1" <<<"$registered"; }
gateway=$(field gateway_id) token=$(field token) expires=$(field expires)

echo "2/3 on the gateway, claim the identity (token shown once; valid until $expires):"
echo
echo "    careflow-edge claim --serial $serial --token $token \\"
echo "        --claim-cert claim.crt --claim-key claim.key --ca-file device-ca.crt \\"
echo "        --broker mqtts://HUB:8884 --out /var/lib/careflow-edge --run"
echo
echo "3/3 watching $serial → $gateway (up to ${timeout}s)"
if "$careflow" provision watch "$serial" --timeout "$timeout"; then
    echo "PASS: $gateway is active at $site"
else
    echo "FAIL: $serial did not become active; the step and what to check are above" >&2
    exit 1
fi
