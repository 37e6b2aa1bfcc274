#!/usr/bin/env bash
# The recorder under load: for each stream count, the release binary records loadgen's
# paced 20 ms G.711 streams on loopback for S seconds, and this prints packets lost, the
# recorder's CPU microseconds per stream-second and its memory per active stream; then
# tcpdump -w captures the same traffic (a plain, unencrypted capture) for comparison.
#   bash benches/recorder_load.sh [SECONDS] [STREAMS...]     (defaults: 20 s; 500 2000 5000)
# Needs tcpdump (apt-get install tcpdump) for the comparison; loadgen runs on the same two
# cores, so the figures include that competition.
set -euo pipefail
secs=${1:-20}; shift || true
counts=("${@:-500 2000 5000}")
read -r -a counts <<< "${counts[*]}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/edgerec
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU ticks of one named thread of a process.
thread_ticks() { for t in /proc/$1/task/*; do if [ "$(cat "$t/comm")" = "$2" ]; then awk '{print $14 + $15}' "$t/stat"; fi; done | awk '{s += $1} END {print s + 0}'; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "http://$maddr/metrics" | awk -v n="$1" '$1 == n {print $2}'; }

printf '%-8s %-10s %-10s %-8s %-22s %-18s %-16s %-20s\n' streams sent stored lost cpu_us_per_stream_s ingest/recorder rss_per_stream tcpdump_cpu_us_per_stream_s
for n in "${counts[@]}"; do
  ports=$(( (n + 1) / 2 ))
  first=41000; last=$(( first + ports - 1 ))
  rm -rf "$work/run"; mkdir -p "$work/run"
  cat > "$work/run/edgerec.toml" <<TOML
[recorder]
spool_dir = "spool"
idle_timeout_ms = 3000
[ingest]
ports = "$first-$last"
# every call of the load starts in the same 20 ms, all from 127.0.0.1 (no SBC does that)
max_starts_per_source_per_sec = 100000
[keys]
public_key = "$PWD/samples/demo-kek.pub.pem"
demo = true
[store]
path = "store"
[metrics]
listen = "127.0.0.1:0"
TOML
  "$bin" run --config "$work/run/edgerec.toml" 2> "$work/run/log" &
  pid=$!
  until grep -q "listening for RTP" "$work/run/log"; do
    kill -0 $pid 2>/dev/null || { cat "$work/run/log"; exit 1; }
    sleep 0.1
  done
  maddr=$(grep -o 'metrics_addr=[^ ]*' "$work/run/log" | head -1 | cut -d= -f2)
  rss0=$(rss_kb $pid); t0=$(cpu_ticks $pid)
  i0=$(thread_ticks $pid ingest); r0=$(thread_ticks $pid recorder)
  "$bin" loadgen --target 127.0.0.1 --ports "$first-$last" --streams "$n" --seconds "$secs" > "$work/run/lg" 2>/dev/null &
  lg=$!
  sleep $(( secs / 2 )); rss1=$(rss_kb $pid)
  wait $lg
  t1=$(cpu_ticks $pid)
  i1=$(thread_ticks $pid ingest); r1=$(thread_ticks $pid recorder)
  sent=$(awk '/packets_sent/ {print $2}' "$work/run/lg")
  sleep 1
  stored=$(metric edgerec_rtp_packets_received_total)
  curl -s "http://$maddr/metrics" | grep '^edgerec_datagrams_rejected_total' | sed 's/^/  /' >&2 || true
  kill -TERM $pid; wait $pid || true
  echo "  (shutdown with $ports recordings took until $(date +%T))" >&2
  # The same traffic into tcpdump -w.
  tcpcpu=n/a
  if command -v tcpdump >/dev/null; then
    tcpdump -i lo -w "$work/cap.pcap" -B 65536 "udp and dst portrange $first-$last" 2>/dev/null &
    td=$!; sleep 1; c0=$(cpu_ticks $td)
    "$bin" loadgen --target 127.0.0.1 --ports "$first-$last" --streams "$n" --seconds "$secs" > /dev/null 2>&1
    c1=$(cpu_ticks $td); kill $td; wait $td 2>/dev/null || true; rm -f "$work/cap.pcap"
    tcpcpu=$(python3 -c "print(round(($c1-$c0)/$hz*1e6/($n*$secs), 1))")
  fi
  python3 - "$n" "$secs" "$sent" "${stored:-0}" "$t0" "$t1" "$hz" "$rss0" "$rss1" "$tcpcpu" "$i0" "$i1" "$r0" "$r1" <<'PY'
import sys
n, secs, sent, stored, t0, t1, hz, rss0, rss1, tcp, i0, i1, r0, r1 = sys.argv[1:]
n, secs, sent, stored, hz = int(n), float(secs), int(sent), int(float(stored)), int(hz)
us = lambda a, b: (int(b) - int(a)) / hz * 1e6 / (n * secs)
per = (int(rss1) - int(rss0)) * 1024 / n
split = f"{us(i0, i1):.0f}/{us(r0, r1):.0f}"
print(f"{n:<8} {sent:<10} {stored:<10} {sent - stored:<8} {us(t0, t1):<22.1f} {split:<18} {per / 1024:<13.1f}KiB   {tcp}")
PY
done
