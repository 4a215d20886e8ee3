#!/usr/bin/env bash
# Side-by-side wall time of `childwatch run`, GNU parallel and `xargs -P`:
# 2,000 trivial jobs and 200 jobs with output (about 48 KB each), at -j 2
# and -j 16, median of three runs each. Output goes to /dev/null.
#
# Usage: childwatch-cli/scripts/side-by-side.sh [PATH/TO/childwatch]
# (default: target/release/childwatch; build it with
#  cargo build --release -p childwatch-cli). Needs GNU parallel and xargs.
set -euo pipefail

CW=${1:-target/release/childwatch}
command -v parallel >/dev/null || { echo "GNU parallel is not installed" >&2; exit 1; }
[ -x "$CW" ] || { echo "no childwatch binary at $CW" >&2; exit 1; }
# GNU parallel asks once for a citation; keep its state out of $HOME.
export PARALLEL_HOME=${PARALLEL_HOME:-$(mktemp -d)}
touch "$PARALLEL_HOME/will-cite"

secs() { date +%s.%N; }

# median of three runs of "$@" (a shell snippet), in seconds
median3() {
    local t=()
    for _ in 1 2 3; do
        local a b
        a=$(secs)
        bash -c "$1" >/dev/null 2>&1
        b=$(secs)
        t+=("$(echo "$b - $a" | bc -l)")
    done
    printf '%s\n' "${t[@]}" | sort -g | sed -n 2p
}

printf '%-26s %-5s %12s %12s %12s\n' workload "-j" childwatch parallel "xargs -P"
for j in 2 16; do
    cw=$(median3 "seq 2000 | $CW run -j $j true")
    gp=$(median3 "seq 2000 | parallel -j $j true")
    xa=$(median3 "seq 2000 | xargs -P $j -n 1 true")
    printf '%-26s %-5s %11.2fs %11.2fs %11.2fs\n' "2000 x true" "$j" "$cw" "$gp" "$xa"
    cw=$(median3 "seq 200 | $CW run -j $j seq {} 10000")
    gp=$(median3 "seq 200 | parallel -j $j seq {} 10000")
    xa=$(median3 "seq 200 | xargs -P $j -I{} seq {} 10000")
    printf '%-26s %-5s %11.2fs %11.2fs %11.2fs\n' "200 x seq {} 10000 (48KB)" "$j" "$cw" "$gp" "$xa"
done
