#!/usr/bin/env bash
# The appliance end to end on one machine, with the embedded defaults (samples/edgerec.toml,
# the demo key, a local directory as the store): start it, replay the sample call into it
# (samples/sample-call.pcap: 4 s, two legs of PCMU, a 1,000 Hz and a 1,500 Hz tone), wait
# until the sealed package is in the store, stop the appliance, then decrypt the call to WAV
# and pcap.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/edgerec
rm -rf var/spool var/store var/export
mkdir -p var
log=var/edgerec.log
"$bin" run --config samples/edgerec.toml 2> "$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
until grep -q "listening for RTP" "$log" 2>/dev/null; do
  kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
echo "== replaying samples/sample-call.pcap (a 4 s two-leg call) to 127.0.0.1:40000"
"$bin" loadgen --target 127.0.0.1 --ports 40000-40099 --replay samples/sample-call.pcap
echo "== waiting for the call to end (5 s idle) and reach the store"
until [ -n "$(find var/store -name '*.erec' 2>/dev/null)" ]; do sleep 0.2; done
kill -TERM "$pid"; wait "$pid" || true; trap - EXIT
pkg=$(find var/store -name '*.erec' | head -n 1)
echo "== stored: $pkg"
"$bin" inspect "$pkg"
echo "== the appliance's log is $log; decrypting with the demo private key"
"$bin" export --key samples/demo-kek.DEMO-ONLY-private.pem --out var/export "$pkg"
"$bin" export --key samples/demo-kek.DEMO-ONLY-private.pem --out var/export --format pcap "$pkg"
find var/export -type f | sort
