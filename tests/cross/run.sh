#!/usr/bin/env bash
# The cross lane: the ECU build for 64-bit and 32-bit ARM, and its tests
# under qemu-user.
#
# rustup cannot fetch other targets on our machines, so the lane uses
# Debian's own Rust (rustc-web/cargo-web, with libstd-rust-web-dev for arm64
# and armhf) and the gcc cross linkers. Per target it:
#   1. builds the lean ECU binary (`--release --no-default-features`), as
#      shipped, and reports its size;
#   2. builds the library's unit tests and the integration tests that need
#      no network service and no real SocketCAN (one test build), runs each
#      under qemu-user through binfmt_misc, and accounts for every
#      integration test file: run here, or skipped with the reason;
#   3. runs the CLI (`--help` of every command, `decode`, `check-config`,
#      and `pki dev` from the test build) and compares it with the x86_64
#      build's output;
#   4. packages the lean binary as a .deb (cargo-deb, `--target`, from
#      Cargo.toml's [package.metadata.deb]: the same unit, sysusers entry
#      and example config as on amd64) and checks it with `dpkg-deb` and
#      `dpkg --dry-run` against the multiarch setup.
# It prints "cross lane: <target>: ..." per target and a last line
# "cross lane: N passed, M failed", and exits non-zero on any failure.
#
# Usage: tests/cross/run.sh
# Environment (all optional):
#   BMSGW_CROSS_TARGETS   targets (default: aarch64-unknown-linux-gnu
#                         armv7-unknown-linux-gnueabihf)
#   BMSGW_CROSS_OUT       output directory (default target/cross-lane)
#   BMSGW_HOST_LEAN       the x86_64 lean binary to compare with (default
#                         target/release/bmsgw, built here if missing)
#   BMSGW_HOST_SIM        the x86_64 default-feature binary (default
#                         target/debug/bmsgw, built here if missing)
#   BMSGW_CROSS_NO_INSTALL=1  fail instead of installing what is missing
#
# Pitfalls this avoids (each seen): Debian's cargo would pick up rustup's
# rustc, so RUSTC is set; qemu must not get `-L /usr/<triple>` (two glibc
# builds mixed: threaded programs hang), the multiarch libc6:arm64/armhf
# make it unnecessary; tests that start the test binary or bmsgw itself
# need binfmt_misc mounted and qemu registered with it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${BMSGW_CROSS_OUT:-$ROOT/target/cross-lane}
read -r -a TARGETS <<<"${BMSGW_CROSS_TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}"
HOST_LEAN=${BMSGW_HOST_LEAN:-$ROOT/target/release/bmsgw}
HOST_SIM=${BMSGW_HOST_SIM:-$ROOT/target/debug/bmsgw}

# Integration test binaries (tests/*.rs, tests/*/main.rs) run under
# emulation. Every other one must be in SKIPPED with its reason: a new test
# binary fails the lane until it is placed in one or the other.
RUN_TESTS=(system signals)
declare -A SKIPPED=(
    [broker]="needs mosquitto and the embedded broker over TCP (network services)"
    [vm]="needs root, real SocketCAN and a tmpfs; runs in the VM lane"
)

log() { printf '[cross lane] %s\n' "$*" >&2; }
now() { date +%s; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

mkdir -p "$OUT"
: >"$OUT/results.txt"
result() { echo "$1 $2" >>"$OUT/results.txt"; echo "$1 $2"; }

# --- accounting ------------------------------------------------------------
unplaced=()
for f in "$ROOT"/tests/*.rs "$ROOT"/tests/*/main.rs; do
    name=$(basename "$f" .rs)
    [ "$name" = main ] && name=$(basename "$(dirname "$f")")
    if [[ " ${RUN_TESTS[*]} " != *" $name "* && -z "${SKIPPED[$name]:-}" ]]; then
        unplaced+=("$name")
    fi
done
if [ ${#unplaced[@]} -gt 0 ]; then
    log "test binaries neither run nor skipped in tests/cross/run.sh: ${unplaced[*]}"
    echo "cross lane: 0 passed, 1 failed"
    exit 1
fi

# --- install ---------------------------------------------------------------
triple_arch() {
    case $1 in
    aarch64-*) echo arm64 ;;
    armv7-*) echo armhf ;;
    *) log "unknown target $1"; exit 2 ;;
    esac
}
triple_gcc() {
    case $1 in
    aarch64-*) echo aarch64-linux-gnu-gcc ;;
    armv7-*) echo arm-linux-gnueabihf-gcc ;;
    esac
}
triple_qemu() {
    case $1 in
    aarch64-*) echo qemu-aarch64 ;;
    armv7-*) echo qemu-arm ;;
    esac
}

t0=$(now)
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in rustc-web cargo-web qemu-user-static binfmt-support; do
    have_pkg "$p" || need+=("$p")
done
archs=()
for t in "${TARGETS[@]}"; do
    a=$(triple_arch "$t")
    archs+=("$a")
    for p in "libstd-rust-web-dev:$a" "libc6:$a" "libgcc-s1:$a"; do have_pkg "$p" || need+=("$p"); done
    g=$(triple_gcc "$t")
    have_pkg "gcc-${g%-gcc}" || need+=("gcc-${g%-gcc}")
done
if [ ${#need[@]} -gt 0 ]; then
    [ "${BMSGW_CROSS_NO_INSTALL:-0}" = 1 ] && { log "missing: ${need[*]}"; exit 2; }
    log "installing: ${need[*]}"
    for a in "${archs[@]}"; do
        dpkg --print-foreign-architectures | grep -qx "$a" || as_root dpkg --add-architecture "$a"
    done
    as_root apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# binfmt_misc, so that an ARM executable runs by itself (tests start the
# test binary and bmsgw as child processes).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
for t in "${TARGETS[@]}"; do
    q=$(triple_qemu "$t")
    [ -e "/proc/sys/fs/binfmt_misc/$q" ] || as_root update-binfmts --enable "$q" >/dev/null 2>&1 || true
    [ -e "/proc/sys/fs/binfmt_misc/$q" ] || { log "binfmt_misc has no $q entry (update-binfmts --enable $q)"; exit 2; }
done
# cargo-deb, with rustup's cargo (it is a host tool).
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked -q
t_install=$(($(now) - t0))

export RUSTC=/usr/bin/rustc
CARGO=/usr/bin/cargo
export CARGO_TARGET_DIR=$ROOT/target/cross
# The test builds need no debug info (they are run, not debugged, here):
# less to generate and link under CI's time limit. Not incremental: each
# CI run builds once, from cold.
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0 CARGO_INCREMENTAL=0
for t in "${TARGETS[@]}"; do
    var=CARGO_TARGET_$(echo "$t" | tr 'a-z-' 'A-Z_')_LINKER
    export "$var=$(triple_gcc "$t")"
done
log "$("$RUSTC" --version); $("$CARGO" --version)"

# The x86_64 builds to compare with (rustup's toolchain, as CI builds them).
[ -x "$HOST_LEAN" ] || (cd "$ROOT" && CARGO_TARGET_DIR= RUSTC= cargo build --release --no-default-features -q)
[ -x "$HOST_SIM" ] || (cd "$ROOT" && CARGO_TARGET_DIR= RUSTC= cargo build -q)
# A default-feature build there (e.g. after the VM lane's `cargo build
# --release`) would differ in --help for the wrong reason.
if "$HOST_LEAN" --help | grep -qE '^  (sim|pki) '; then
    log "$HOST_LEAN has the simulators: not the lean build to compare with (cargo build --release --no-default-features, or set BMSGW_HOST_LEAN)"
    exit 2
fi

passed=0
failed=0
fail() { failed=$((failed + 1)); result FAIL "$1"; }
pass() { passed=$((passed + 1)); result PASS "$1"; }

# same NAME EXPECTED_FILE ACTUAL_FILE
same() {
    if cmp -s "$2" "$3"; then pass "$1"; else
        fail "$1"
        diff -u "$2" "$3" | head -n 20 >&2 || true
    fi
}

# deb_checks TARGET: package the lean build and check the package.
deb_checks() {
    local t=$1 dir=$OUT/$1/deb arch
    arch=$(triple_arch "$t")
    rm -rf "$dir"
    mkdir -p "$dir"
    # cargo-deb takes the binary from $CARGO_TARGET_DIR/<target>/release
    # (--no-build: Debian's cargo built it above) and strips nothing more.
    if ! (cd "$ROOT" && cargo deb --target "$t" --no-build --no-strip --no-default-features \
        --output "$dir") >"$dir/cargo-deb.log" 2>&1; then
        fail "$t deb: cargo deb"
        tail -n 20 "$dir/cargo-deb.log" >&2
        return
    fi
    local deb
    deb=$(ls "$dir"/*.deb)
    dpkg-deb -c "$deb" | awk '{ print $1, $6 }' >"$dir/contents.txt"
    local want missing=0
    for want in "-rwxr-xr-x ./usr/bin/bmsgw" "-rw-r--r-- ./lib/systemd/system/bmsgw.service" \
        "-rw-r--r-- ./usr/lib/sysusers.d/bmsgw.conf" "-rw-r----- ./etc/bmsgw/bmsgw.toml"; do
        grep -qxF -- "$want" "$dir/contents.txt" || { echo "$t deb: no '$want'" >&2; missing=1; }
    done
    local got
    got=$(dpkg-deb -f "$deb" Architecture)
    [ "$got" = "$arch" ] || { echo "$t deb: Architecture $got, not $arch" >&2; missing=1; }
    # The packaged binary is the one built for the target.
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/bmsgw | cmp -s - "$CARGO_TARGET_DIR/$t/release/bmsgw" ||
        { echo "$t deb: usr/bin/bmsgw is not the lean $t build" >&2; missing=1; }
    if [ "$missing" -eq 0 ]; then pass "$t deb contents ($(basename "$deb"))"; else fail "$t deb contents"; fi
    # Would it install here, next to the amd64 system? (Depends and
    # Architecture against the multiarch setup; nothing is installed.)
    if as_root dpkg --dry-run -i "$deb" >"$dir/dry-run.log" 2>&1; then
        pass "$t deb dpkg --dry-run"
    else
        fail "$t deb dpkg --dry-run"
        tail -n 10 "$dir/dry-run.log" >&2
    fi
}

cli_checks() {
    local t=$1 lean=$2 sim=$3 dir=$OUT/$t/cli
    rm -rf "$dir"
    mkdir -p "$dir/host" "$dir/target"
    local cmd
    for side in host target; do
        local bin=$lean simbin=$sim
        [ "$side" = host ] && bin=$HOST_LEAN simbin=$HOST_SIM
        local d=$dir/$side
        for cmd in "" run check-config status ticket decode; do
            # shellcheck disable=SC2086
            "$bin" $cmd --help >"$d/help-${cmd:-main}.txt" 2>&1 || true
        done
        (cd "$ROOT" && "$bin" decode fuzz/corpus/candump/session) >"$d/decode-session.txt" 2>&1 || true
        (cd "$ROOT" && "$bin" decode fuzz/corpus/candump/cut-off; echo "exit $?") >"$d/decode-cut-off.txt" 2>&1 || true
        (cd "$ROOT" && "$bin" check-config config/bmsgw.toml; echo "exit $?") >"$d/check-config.txt" 2>&1 || true
        # Keys are random: compare what was written, and each file's mode.
        rm -rf "$d/pki"
        (cd "$d" && "$simbin" pki dev --out pki >/dev/null 2>&1; echo "exit $?") >"$d/pki-dev.txt"
        (cd "$d/pki" && find . -type f -printf '%m %p\n' | sort) >>"$d/pki-dev.txt" 2>&1 || true
    done
    for f in "$dir"/host/*.txt; do
        same "$t cli $(basename "$f" .txt)" "$f" "$dir/target/$(basename "$f")"
    done
}

summary=()
for t in "${TARGETS[@]}"; do
    log "=== $t"
    tt=$OUT/$t
    mkdir -p "$tt"
    s=$(now)
    if ! (cd "$ROOT" && "$CARGO" build --release --no-default-features --target "$t" -q) >"$tt/build-lean.log" 2>&1; then
        fail "$t lean build"
        tail -n 30 "$tt/build-lean.log" >&2
        continue
    fi
    t_lean=$(($(now) - s))
    lean=$CARGO_TARGET_DIR/$t/release/bmsgw
    size=$(stat -c %s "$lean")
    pass "$t lean build ($size bytes, ${t_lean}s)"
    deb_checks "$t"

    s=$(now)
    args=(--lib)
    for n in "${RUN_TESTS[@]}"; do args+=(--test "$n"); done
    if ! (cd "$ROOT" && "$CARGO" test --target "$t" --no-run "${args[@]}") >"$tt/build-tests.log" 2>&1; then
        fail "$t test build"
        tail -n 30 "$tt/build-tests.log" >&2
        continue
    fi
    t_tests=$(($(now) - s))
    sim=$CARGO_TARGET_DIR/$t/debug/bmsgw

    s=$(now)
    tp=0 tf=0 ti=0 bins=0
    while read -r src exe; do
        name=$(basename "$src" .rs)
        [ "$name" = main ] && name=$(basename "$(dirname "$src")")
        [ "$src" = src/lib.rs ] && name=lib
        bins=$((bins + 1))
        log "$t: $name"
        rc=0
        # qemu-arm reserves the 32-bit guest's whole 4 GiB address space
        # at start, above cli_matrix's 512 MiB `ulimit -v`.
        vmem=
        [[ $t == armv7-* ]] && vmem=$((512 * 1024 + 4 * 1024 * 1024))
        (cd "$ROOT" && BMSGW_CLI_MATRIX_VMEM_KIB=$vmem timeout 1800 "$exe") >"$tt/test-$name.log" 2>&1 || rc=$?
        line=$(grep -E '^test result:' "$tt/test-$name.log" | tail -n 1)
        p=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line")
        f=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line")
        i=$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$line")
        tp=$((tp + ${p:-0})) tf=$((tf + ${f:-0})) ti=$((ti + ${i:-0}))
        if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
            pass "$t test $name: $line"
        else
            fail "$t test $name (exit $rc): ${line:-no result line}"
            grep -E '^test .* FAILED$|panicked' "$tt/test-$name.log" | head -n 10 >&2 || true
        fi
    done < <(sed -nE 's/^ *Executable (unittests )?([^ ]+) \(([^)]+)\)$/\2 \3/p' "$tt/build-tests.log")
    t_run=$(($(now) - s))

    cli_checks "$t" "$lean" "$sim"
    summary+=("cross lane: $t: lean $size bytes; $bins test binaries: $tp passed, $tf failed, $ti ignored; build lean ${t_lean}s, tests ${t_tests}s, run ${t_run}s")
done

for n in "${!SKIPPED[@]}"; do echo "cross lane: not run under emulation: test binary $n: ${SKIPPED[$n]}"; done | sort
printf '%s\n' "${summary[@]}"
echo "cross lane: install ${t_install}s, total $(($(now) - t0))s"
echo "cross lane: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
