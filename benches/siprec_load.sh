#!/usr/bin/env bash
# The SIPREC recording server under load: sipp (Debian's sip-tester) opens SESSIONS recording
# sessions over TCP at RATE a second (tests/sipp/siprec_call.xml: two streams and RFC 7865
# metadata each, a µ-law tone played to the first stream), holds them for SECONDS, and hangs
# up. Prints the sessions sipp completed, the packages stored, the RTP packets stored against
# those sent, edgerec's CPU microseconds per stream-second and its memory per session.
#   bash benches/siprec_load.sh [SESSIONS] [SECONDS] [RATE]       (defaults: 200 20 50)
# Needs sipp and sox (apt-get install sip-tester sox). sipp runs on the same two cores.
set -euo pipefail
sessions=${1:-200}; secs=${2:-20}; rate=${3:-50}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/edgerec
scenario=$PWD/tests/sipp/siprec_call.xml
work=$(mktemp -d); echo "work: $work (KEEP=1 keeps it)" >&2
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# CPU ticks by thread name: "name ticks" lines.
by_thread() { for t in /proc/$1/task/*; do printf '%s %s\n' "$(tr ' ' _ < "$t/comm")" "$(awk '{print $14 + $15}' "$t/stat")"; done | awk '{s[$1] += $2} END {for (k in s) print k, s[k]}' | sort; }
metric() { curl -s "http://$maddr/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
# Four media ports a session (two streams, RTP and RTCP each), and some room.
media_last=$(( 42000 + sessions * 4 + 63 ))
cat > "$work/edgerec.toml" <<TOML
[recorder]
spool_dir = "spool"
[ingest]
ports = "41000-41003"
[keys]
public_key = "$PWD/samples/demo-kek.pub.pem"
demo = true
[store]
path = "store"
[metrics]
listen = "127.0.0.1:0"
[siprec]
listen = "127.0.0.1:0"
media_ports = "42000-$media_last"
allow = ["127.0.0.0/8"]
max_sessions = $(( sessions + 10 ))
TOML
(cd "$work" && sox -n -r 8000 -c 1 -e u-law leg1.wav synth "$secs" sine 440)
"$bin" run --config "$work/edgerec.toml" 2> "$work/log" &
pid=$!
until grep -q "SIPREC server listening" "$work/log"; do
  kill -0 $pid 2>/dev/null || { cat "$work/log"; exit 1; }
  sleep 0.1
done
sip=$(grep -o 'local=[^ ]*' "$work/log" | head -1 | cut -d= -f2)
maddr=$(grep -o 'metrics_addr=[^ ]*' "$work/log" | head -1 | cut -d= -f2)
rss0=$(rss_kb $pid); t0=$(cpu_ticks $pid); by_thread $pid > "$work/threads0"
(cd "$work" && sipp "$sip" -sf "$scenario" -t t1 -m "$sessions" \
  -l "$sessions" -r "$rate" -d $(( secs * 1000 + 500 )) -i 127.0.0.1 -mi 127.0.0.1 -p 0 \
  -nostdin -timeout $(( secs * 3 + 60 ))s -key conversation bench \
  -trace_stat -stf stats.csv -trace_err -error_file sipp.err > /dev/null 2>&1) &
sp=$!
sleep $(( secs / 2 + sessions / rate )); rss1=$(rss_kb $pid); active=$(metric edgerec_siprec_sessions_active)
wait $sp && sipp_ok=yes || sipp_ok="no (see sipp.err)"
t1=$(cpu_ticks $pid); end=$SECONDS; by_thread $pid > "$work/threads1"
until [ "$(find "$work/store" -name '*.erec' 2>/dev/null | wc -l)" -ge "$sessions" ] || \
      [ $(( SECONDS - end )) -gt 30 ]; do sleep 0.2; done
stored_pkgs=$(find "$work/store" -name '*.erec' | wc -l)
rtp=$(metric edgerec_rtp_packets_received_total)
lost=$(metric edgerec_rtp_packets_lost_total)
bye=$(metric 'edgerec_siprec_sessions_total{outcome="bye"}')
curl -s "http://$maddr/metrics" | grep -E '^edgerec_(datagrams_rejected|siprec_sessions_total|siprec_responses)' | sed 's/^/  /' >&2 || true
kill -TERM $pid; wait $pid || true
# Where the CPU went, by thread (µs per stream-second).
join -a 2 -e 0 -o 0,1.2,2.2 "$work/threads0" "$work/threads1" | \
  awk -v hz="$hz" -v n="$sessions" -v s="$secs" '{printf "  thread %-18s %.1f us per stream-second\n", $1, ($3 - $2) / hz * 1e6 / (n * s)}' >&2
python3 - "$sessions" "$secs" "$sipp_ok" "$stored_pkgs" "${rtp:-0}" "${bye:-0}" "$t0" "$t1" "$hz" \
  "$rss0" "$rss1" "${active:-0}" "${lost:-0}" <<'PY'
import sys
n, secs, ok, pkgs, rtp, bye, t0, t1, hz, rss0, rss1, active, lost = sys.argv[1:]
n, secs, hz = int(n), int(secs), int(hz)
expected = n * secs * 50          # one played stream a session, 20 ms packets
cpu = (int(t1) - int(t0)) / hz * 1e6 / (n * secs)
print(f"sessions {n} (active at the middle: {float(active):.0f}), sipp all successful: {ok}")
print(f"packages stored {pkgs}, sessions ended by bye {float(bye):.0f}")
print(f"rtp stored {float(rtp):.0f} (sipp plays {expected} and one more a call), "
      f"missing by sequence number {float(lost):.0f}")
print(f"edgerec cpu {cpu:.1f} us per stream-second (SIP, ingest, recorder, uploader)")
print(f"memory {(int(rss1) - int(rss0)) / n:.1f} KiB per session")
PY
