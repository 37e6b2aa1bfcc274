#!/usr/bin/env bash
# Wall-clock of `edgerec seal` and `edgerec open` against `age -r` on the same 512 MiB file,
# in the same run, on tmpfs (so the disk does not decide). Prints each mean and the ratios.
#   bash benches/seal_vs_age.sh [MiB]        (needs: age, hyperfine; cargo builds release)
set -euo pipefail
mib=${1:-512}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/edgerec
for tool in age age-keygen hyperfine; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install age hyperfine)"; exit 1; }
done
work=$(mktemp -d /dev/shm/edgerec-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
head -c $((mib << 20)) /dev/urandom > "$work/in.bin"
kek=tests/vectors/test-kek
age-keygen -o "$work/age.key" 2>/dev/null
recipient=$(age-keygen -y "$work/age.key")
"$bin" seal --kek "$kek.pub.pem" "$work/in.bin" "$work/sealed.erec"
hyperfine -N --warmup 2 --runs 15 --export-json "$work/h.json" \
  --prepare "rm -f $work/out.erec $work/out.age $work/out.bin" \
  -n "edgerec seal" "$bin seal --kek $kek.pub.pem $work/in.bin $work/out.erec" \
  -n "age -r" "age -r $recipient -o $work/out.age $work/in.bin" \
  -n "edgerec open" "$bin open --key $kek.pem $work/sealed.erec $work/out.bin"
python3 - "$work/h.json" "$mib" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
mib = int(sys.argv[2])
for name, x in r.items():
    print(f"{name:14} mean {x['mean']:.3f} s  median {x['median']:.3f} s  {mib / x['median']:.0f} MiB/s")
seal, age, open_ = (r[k]["median"] for k in ("edgerec seal", "age -r", "edgerec open"))
print(f"seal / age wall-clock (median): {seal / age:.2f}  (<= 1.00 means edgerec is as fast or faster)")
print(f"open / seal wall-clock (median): {open_ / seal:.2f}  (target <= 1.10)")
PY
