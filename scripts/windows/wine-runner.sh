#!/usr/bin/env bash
# Cargo target runner for x86_64-pc-windows-gnu: runs a Windows test binary
# under wine64 in the private wine prefix prepared by scripts/windows-test.sh.
#
#   CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=/path/to/scripts/windows/wine-runner.sh
#
# Environment:
#   WINEPREFIX  the prefix to use (windows-test.sh exports it; default:
#               <workspace>/target/wine-prefix)
#   WINE64      the wine64 binary (default: wine64 on PATH, else /usr/lib/wine/wine64)
#   WINEDEBUG   defaults to -all (no wine debug chatter in test output)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${WINEPREFIX:=$(cd "$here/../.." && pwd)/target/wine-prefix}"
: "${WINEDEBUG:=-all}"
# Never let wine try to install Mono/Gecko (that would pop a dialog).
: "${WINEDLLOVERRIDES:=mscoree=d;mshtml=d}"
export WINEPREFIX WINEDEBUG WINEDLLOVERRIDES

if [[ -z "${WINE64:-}" ]]; then
    if command -v wine64 >/dev/null 2>&1; then
        WINE64="$(command -v wine64)"
    elif [[ -x /usr/lib/wine/wine64 ]]; then
        WINE64=/usr/lib/wine/wine64
    else
        echo "wine-runner.sh: wine64 not found (apt-get install wine64)" >&2
        exit 127
    fi
fi

if [[ ! -f "$WINEPREFIX/system.reg" ]]; then
    echo "wine-runner.sh: $WINEPREFIX is not an initialised wine prefix;" \
         "run scripts/windows-test.sh first" >&2
    exit 1
fi

# A wineserver that dies under a test binary ("wine client error: ...
# Connection reset by peer") is a fault of wine, not of the test: it was
# seen once in several CI runs, on a binary with no test for Windows. Run
# that binary once more then, saying so; any other failure stands.
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
set +e
"$WINE64" "$@" 2>"$err"
rc=$?
set -e
cat "$err" >&2
if [[ $rc -ne 0 ]] && grep -q "wine client error" "$err"; then
    echo "wine-runner.sh: lost the wineserver connection (a wine fault); running $1 once more" >&2
    "$WINE64" "$@"
    exit $?
fi
exit "$rc"
