#!/usr/bin/env bash
# Packets lost to kill -9 under paced streams, with and without the service manager holding
# the sockets (the descriptor store), and the time from kill to READY=1: the harness of
# tests/it/service_manager.rs, run long. Usage: benches/restart_loss.sh [STREAMS] [KILLS]
# (default 50 streams, 10 kills; one stream per port, 50 packets a second each, the next
# process started 100 ms after each kill as RestartSec=100ms does).
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEREC_BENCH_STREAMS=${1:-50} EDGEREC_BENCH_KILLS=${2:-10}
cargo test --release --all-features --test it restart_loss_benchmark -- \
  --ignored --nocapture --test-threads=1 2>&1 | grep -E 'descriptor store|test result'
