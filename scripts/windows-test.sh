#!/usr/bin/env bash
# windows-test.sh: cross-build the workspace's tests for x86_64-pc-windows-gnu
# and run them under wine, on a Debian 12 x86_64 machine (run as root).
#
#   scripts/windows-test.sh                 # = cargo test -p childwatch (for Windows)
#   scripts/windows-test.sh -p childwatch --lib -- some_test_name
#
# Arguments are passed to `cargo test` (default: -p childwatch).
#
# What it does (idempotent: a second run does no apt work and reuses everything):
#  1. Installs, only if missing (checked with dpkg -s), from Debian's packages:
#       rustc-web             rustc 1.96 at /usr/bin/rustc (rustup stays first on PATH)
#       rust-web-src          std source at /usr/lib/rustlib/src/rust, for -Zbuild-std
#       gcc-mingw-w64-x86-64  x86_64-w64-mingw32-gcc, the linker
#       wine64                wine 8.0 (/usr/lib/wine/wine64)
#     No Windows std is shipped by Debian or reachable via rustup here, so std
#     is built from source with Debian's rustc (-Zbuild-std, RUSTC_BOOTSTRAP=1).
#  2. Builds a shim bcryptprimitives.dll (scripts/windows/bcryptprimitives.c):
#     Rust's std imports ProcessPrng from it and wine 8.0 does not have it.
#  3. Prepares a private wine prefix, target/wine-prefix, headless and
#     non-interactively (no DISPLAY, no Mono/Gecko prompts, under `timeout`),
#     and copies the shim into its drive_c/windows/system32.
#  4. Runs, in the workspace root,
#       RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 cargo test \
#         -Zbuild-std=std,panic_abort,test --target x86_64-pc-windows-gnu "$@"
#     with the linker and runner given through CARGO_TARGET_X86_64_PC_WINDOWS_GNU_*
#     environment variables (no .cargo/config.toml, so Linux builds are
#     untouched) and CARGO_TARGET_DIR=target/windows (kept apart from the Linux
#     build: different rustc, and no lock contention with a concurrent Linux build).
#  5. Stops the wineserver of its own prefix (wineserver -k) on exit.
#
# Environment overrides: WINDOWS_CARGO_TARGET_DIR, WINEPREFIX,
# WINDOWS_TEST_WINE_INIT_TIMEOUT (seconds, default 300).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$script_dir/.." && pwd)"
target_triple=x86_64-pc-windows-gnu
mingw_gcc=x86_64-w64-mingw32-gcc
debian_rustc=/usr/bin/rustc
debian_rustdoc=/usr/bin/rustdoc   # same package; doctests need the matching rustdoc

export WINDOWS_CARGO_TARGET_DIR="${WINDOWS_CARGO_TARGET_DIR:-$root/target/windows}"
export WINEPREFIX="${WINEPREFIX:-$root/target/wine-prefix}"
export WINEDEBUG=-all
# Never offer to download/install wine-mono or wine-gecko (that is a GUI prompt).
export WINEDLLOVERRIDES="mscoree=d;mshtml=d"
init_timeout="${WINDOWS_TEST_WINE_INIT_TIMEOUT:-300}"

t_start=$SECONDS
phase() { # phase NAME: announce a step, with the seconds elapsed so far
    echo "==> windows-test: $1 (t=$((SECONDS - t_start))s)" >&2
}

# ---------------------------------------------------------------- 1. packages
phase "checking Debian packages"
packages=(rustc-web rust-web-src gcc-mingw-w64-x86-64 wine64)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    phase "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: skips cargo-web (would add a second cargo),
    # wine32 (needs i386) and wine's X/GL/font extras, none needed headless.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for f in "$debian_rustc" "$debian_rustdoc" /usr/lib/rustlib/src/rust/library/Cargo.lock; do
    [[ -e "$f" ]] || { echo "windows-test: missing $f after install" >&2; exit 1; }
done
command -v "$mingw_gcc" >/dev/null || { echo "windows-test: $mingw_gcc not found" >&2; exit 1; }

if command -v wine64 >/dev/null 2>&1; then
    wine64="$(command -v wine64)"
elif [[ -x /usr/lib/wine/wine64 ]]; then
    wine64=/usr/lib/wine/wine64
else
    echo "windows-test: wine64 not found" >&2; exit 1
fi
wineserver=""
for w in "$(command -v wineserver 2>/dev/null || true)" /usr/lib/wine/wineserver /usr/lib/wine/wineserver64; do
    if [[ -n "$w" && -x "$w" ]]; then wineserver="$w"; break; fi
done
[[ -n "$wineserver" ]] || { echo "windows-test: wineserver not found" >&2; exit 1; }
export WINE64="$wine64" WINESERVER="$wineserver"

# Stop this prefix's wineserver (and with it any wine process left in this
# prefix) however we exit. Only ever our own prefix.
stop_wine() {
    if [[ -d "$WINEPREFIX" ]]; then
        timeout 30 "$wineserver" -k >/dev/null 2>&1 || true
    fi
}
trap stop_wine EXIT

# ------------------------------------------------------------ 2. shim DLL
phase "building bcryptprimitives.dll shim"
shim_dir="$WINDOWS_CARGO_TARGET_DIR/shim"
shim_dll="$shim_dir/bcryptprimitives.dll"
shim_src="$script_dir/windows/bcryptprimitives.c"
shim_def="$script_dir/windows/bcryptprimitives.def"
mkdir -p "$shim_dir"
if [[ ! -f "$shim_dll" || "$shim_src" -nt "$shim_dll" || "$shim_def" -nt "$shim_dll" ]]; then
    "$mingw_gcc" -shared -O2 -Wall -Wextra -o "$shim_dll.tmp" \
        "$shim_src" "$shim_def" -ladvapi32 -Wl,--enable-stdcall-fixup -s
    mv -f "$shim_dll.tmp" "$shim_dll"
fi

# ------------------------------------------------------------ 3. wine prefix
phase "preparing wine prefix $WINEPREFIX"
if [[ ! -f "$WINEPREFIX/.windows-test-initialised" ]]; then
    rm -rf "$WINEPREFIX"
    mkdir -p "$WINEPREFIX"
    # Headless: no DISPLAY means wine can never show a window; stdin from
    # /dev/null and `timeout` mean it can never wait for us.
    env -u DISPLAY -u WAYLAND_DISPLAY timeout "$init_timeout" \
        "$wine64" wineboot -i </dev/null >/dev/null 2>&1 || {
        echo "windows-test: wineboot -i failed or timed out" >&2; exit 1; }
    # wineboot returns before the prefix is fully written; wait for it.
    timeout "$init_timeout" "$wineserver" -w || {
        echo "windows-test: wineserver -w timed out" >&2; exit 1; }
    [[ -f "$WINEPREFIX/system.reg" ]] || {
        echo "windows-test: wine prefix not initialised" >&2; exit 1; }
    touch "$WINEPREFIX/.windows-test-initialised"
fi
sys32="$WINEPREFIX/drive_c/windows/system32"
if ! cmp -s "$shim_dll" "$sys32/bcryptprimitives.dll"; then
    cp -f "$shim_dll" "$sys32/bcryptprimitives.dll"
fi

# ------------------------------------------------------------ 4. cargo test
(($#)) || set -- -p childwatch
phase "cargo test --target $target_triple $*"
cd "$root"
rc=0
env -u DISPLAY -u WAYLAND_DISPLAY \
    RUSTC="$debian_rustc" \
    RUSTDOC="$debian_rustdoc" \
    RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_DIR="$WINDOWS_CARGO_TARGET_DIR" \
    CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER="$mingw_gcc" \
    CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$script_dir/windows/wine-runner.sh" \
    cargo test -Zbuild-std=std,panic_abort,test --target "$target_triple" "$@" </dev/null ||
    rc=$?
phase "done, cargo test exit code $rc"
exit "$rc"
