#!/usr/bin/env bash
# Packets lost to restarts under paced streams, with and without the service manager holding
# the sockets and the datagram journal (the descriptor store), and the time from the stop to
# READY=1: the harness of tests/it/service_manager.rs, run long. Usage:
# benches/restart_loss.sh [STREAMS] [RESTARTS] (default 50 streams, 10 restarts: all kill -9
# but one, an upgrade to a binary at another path by SIGTERM, and a SIGHUP reload a third of
# the way; one stream per port, 50 packets a second each, the next process started 100 ms
# after each stop as RestartSec=100ms does).
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEREC_BENCH_STREAMS=${1:-50} EDGEREC_BENCH_KILLS=${2:-10}
cargo test --release --all-features --test it restart_loss_benchmark -- \
  --ignored --nocapture --test-threads=1 2>&1 | grep -E 'descriptor store|test result'
