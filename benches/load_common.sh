# Shared by the load benchmarks (sourced from the repository's top): builds the release
# binary ($bin), a work directory $work that goes on exit with every process started, and
# the CPU counters of /proc: cpu_ticks PID, thread_ticks PID NAME-PREFIX ($hz ticks a second).
cargo build --release --quiet
bin=$PWD/target/release/edgerec
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU ticks of the threads of a process whose name starts with $2.
thread_ticks() {
  for t in /proc/$1/task/*; do
    case "$(cat "$t/comm")" in "$2"*) awk '{print $14 + $15}' "$t/stat" ;; esac
  done | awk '{s += $1} END {print s + 0}'
}
