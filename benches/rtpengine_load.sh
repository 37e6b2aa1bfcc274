#!/usr/bin/env bash
# rtpengine's userspace call recording (Debian's rtpengine-daemon 10.5: no kernel module,
# `--recording-method=pcap`) on the load of benches/recorder_load.sh in its one-stream-per-
# port shape: each call set up over rtpengine's ng protocol with recording on
# (benches/rtpengine_ng.py), its two legs sent by `edgerec loadgen` to the two ports rtpengine
# allocated. Prints packets sent and recorded (in rtpengine's pcap files) and rtpengine's CPU
# per stream-second over SECONDS of the calls' steady state, to set beside the recorder's.
#   bash benches/rtpengine_load.sh [SECONDS] [STREAMS]          (defaults: 10 s, 2000)
# Needs: apt-get install --no-install-recommends rtpengine-daemon
set -euo pipefail
secs=${1:-10}; n=${2:-2000}
cd "$(dirname "$0")/.."
command -v rtpengine >/dev/null || { echo "needs rtpengine (apt-get install rtpengine-daemon)" >&2; exit 1; }
. benches/load_common.sh
mkdir -p "$work/rec"
# rtpengine may dump core when it is stopped: not into the repository.
(cd "$work" && ulimit -c 0 && exec rtpengine --foreground --table=-1 --interface=127.0.0.1 --listen-ng=127.0.0.1:22222 \
  --port-min=42000 --port-max=65000 --recording-dir="$work/rec" --recording-method=pcap \
  --recording-format=raw --log-stderr --log-level=4 --num-threads=2 2> "$work/log") &
rtpe=$!
sleep 1
python3 benches/rtpengine_ng.py $(( (n + 1) / 2 )) 22222 39000 > "$work/ports" &
until [ -s "$work/ports" ]; do sleep 0.2; done
ports=$(cut -d, -f1-"$n" "$work/ports")
"$bin" loadgen --target 127.0.0.1 --ports "$ports" --streams "$n" --per-port 1 \
  --seconds $(( secs + 3 )) > "$work/lg" 2>/dev/null &
lg=$!
sleep 2; t0=$(cpu_ticks $rtpe); sleep "$secs"; t1=$(cpu_ticks $rtpe)
wait $lg
sleep 1
kill -TERM $rtpe; wait $rtpe 2>/dev/null || true
sent=$(awk '/packets_sent/ {print $2}' "$work/lg")
python3 - "$work/rec" "$n" "$secs" "$sent" "$t0" "$t1" "$hz" <<'PY'
import glob, os, struct, sys
rec, n, secs, sent, t0, t1, hz = sys.argv[1:]
n, secs, sent, hz = int(n), float(secs), int(sent), int(hz)
recorded = 0
for f in glob.glob(os.path.join(rec, "**", "*.pcap"), recursive=True):
    with open(f, "rb") as fh:
        data = fh.read()
    i = 24
    while i + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, i + 8)[0]
        i += 16 + caplen
        recorded += 1
us = (int(t1) - int(t0)) / hz * 1e6 / (n * secs)
print(f"rtpengine {n} streams (one a port): sent {sent}, recorded {recorded}, "
      f"{us:.1f} CPU-us per stream-second")
PY
