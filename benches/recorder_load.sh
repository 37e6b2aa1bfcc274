#!/usr/bin/env bash
# The recorder under load: for each load shape, ingest mode and stream count, the release
# binary records loadgen's paced 20 ms G.711 streams on loopback for S seconds; then
# tcpdump -w captures the same traffic (a plain, unencrypted capture) in the same run.
# Prints packets lost, CPU microseconds per stream-second of the calls' steady state (the
# whole process, and its ingest / recorder / uploader / other threads — uploader: the async
# runtime's workers, which run the uploads (and metrics, control, SIP); other: the package
# opener, the syncer, the outcome journal), the memory the load added per stream, tcpdump's
# CPU per stream-second, and the CPU of starting a recording (the opener's, per recording).
#   bash benches/recorder_load.sh [SECONDS] [STREAMS...]      (defaults: 20 s; 2000 10000)
#   SHAPES="2 1"  streams per port: 2 (two legs of a call per port), 1 (one port per stream,
#                 as SIPREC's m-lines); both by default
#   MODES="recvmmsg ring"  [ingest] mode values to compare (default: the configured default)
# Needs tcpdump (apt-get install tcpdump) for the comparison, and CAP_NET_RAW for the ring
# mode; loadgen runs on the same two cores, so every figure includes that competition.
set -euo pipefail
secs=${1:-20}; shift || true
counts=("${@:-2000 10000}")
read -r -a counts <<< "${counts[*]}"
read -r -a shapes <<< "${SHAPES:-2 1}"
read -r -a modes <<< "${MODES:-default}"
cd "$(dirname "$0")/.."
# 10,000 one-stream ports need 20,000 open files and more (a socket and a package each).
ulimit -n 65536 2>/dev/null || true
. benches/load_common.sh
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "http://$maddr/metrics" | awk -v n="$1" '$1 == n {print $2}'; }

printf '%-6s %-9s %-8s %-9s %-9s %-6s %-9s %-18s %-10s %-8s %s\n' \
  shape mode streams sent stored lost cpu_us ing/rec/upl/rest KiB/stream tcpdump us/start
for shape in "${shapes[@]}"; do
for mode in "${modes[@]}"; do
for n in "${counts[@]}"; do
  ports=$(( (n + shape - 1) / shape ))
  first=41000; last=$(( first + ports - 1 ))
  rm -rf "$work/run"; mkdir -p "$work/run"
  modeline=""; [ "$mode" = default ] || modeline="mode = \"$mode\""
  cat > "$work/run/edgerec.toml" <<TOML
[recorder]
spool_dir = "spool"
idle_timeout_ms = 3000
[ingest]
ports = "$first-$last"
$modeline
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
  rss0=$(rss_kb $pid); o0=$(thread_ticks $pid opener)
  # The calls start in the first 20 ms; what they cost per stream-second is measured over
  # SECONDS of their steady state, from 2 s in (each call's start — a data key, its RSA
  # wrap, a spool file — is counted apart, per recording, from the opener thread).
  "$bin" loadgen --target 127.0.0.1 --ports "$first-$last" --streams "$n" --per-port "$shape" \
    --seconds $(( secs + 3 )) > "$work/run/lg" 2>/dev/null &
  lg=$!
  sleep 2
  t0=$(cpu_ticks $pid); i0=$(thread_ticks $pid ingest); r0=$(thread_ticks $pid recorder)
  u0=$(thread_ticks $pid tokio-rt)
  sleep $(( secs / 2 )); rss1=$(rss_kb $pid); sleep $(( secs - secs / 2 ))
  t1=$(cpu_ticks $pid); i1=$(thread_ticks $pid ingest); r1=$(thread_ticks $pid recorder)
  u1=$(thread_ticks $pid tokio-rt)
  wait $lg
  o1=$(thread_ticks $pid opener)
  sent=$(awk '/packets_sent/ {print $2}' "$work/run/lg")
  sleep 1
  stored=$(metric edgerec_rtp_packets_received_total)
  started=$(metric edgerec_recordings_started_total)
  curl -s "http://$maddr/metrics" | grep -E '^edgerec_(datagrams_rejected|recordings_refused)_total' \
    | grep -v ' 0$' | sed 's/^/  /' >&2 || true
  kill -TERM $pid; wait $pid || true
  # The same traffic into tcpdump -w.
  tcpcpu=n/a
  if command -v tcpdump >/dev/null; then
    tcpdump -i lo -w "$work/cap.pcap" -B 65536 "udp and dst portrange $first-$last" 2>/dev/null &
    td=$!; sleep 1
    "$bin" loadgen --target 127.0.0.1 --ports "$first-$last" --streams "$n" --per-port "$shape" \
      --seconds $(( secs + 3 )) > /dev/null 2>&1 &
    lg=$!; sleep 2; c0=$(cpu_ticks $td); sleep "$secs"; c1=$(cpu_ticks $td)
    wait $lg; kill $td; wait $td 2>/dev/null || true; rm -f "$work/cap.pcap"
    tcpcpu=$(python3 -c "print(round(($c1-$c0)/$hz*1e6/($n*$secs), 1))")
  fi
  python3 - "$shape" "$mode" "$n" "$secs" "$sent" "${stored:-0}" "$t0" "$t1" "$hz" "$rss0" "$rss1" \
    "$tcpcpu" "$i0" "$i1" "$r0" "$r1" "$o0" "$o1" "${started:-0}" "$u0" "$u1" <<'PY'
import sys
(shape, mode, n, secs, sent, stored, t0, t1, hz, rss0, rss1, tcp, i0, i1, r0, r1, o0, o1,
 started, u0, u1) = sys.argv[1:]
n, secs, sent, stored, hz = int(n), float(secs), int(sent), int(float(stored)), int(hz)
us = lambda a, b: (int(b) - int(a)) / hz * 1e6 / (n * secs)
total, ing, rec, up = us(t0, t1), us(i0, i1), us(r0, r1), us(u0, u1)
per = (int(rss1) - int(rss0)) / n
split = f"{ing:.0f}/{rec:.0f}/{up:.0f}/{total - ing - rec - up:.0f}"
opened = (int(o1) - int(o0)) / hz * 1e6 / max(1, int(float(started)))
print(f"{shape + '/port':<6} {mode:<9} {n:<8} {sent:<9} {stored:<9} {sent - stored:<6} {total:<9.1f} "
      f"{split:<18} {per:<10.1f} {tcp:<8} {opened:.0f}")
PY
done
done
done
