#!/usr/bin/env bash
# Build and run the libFuzzer harnesses of tests/fuzz (the C code of firmware/lib/tpfed/src)
# with ASan + UBSan, as 64-bit and 32-bit programs.
#
#   tools/fuzz.sh                 10 s per harness and width (FUZZ_SECONDS overrides)
#   tools/fuzz.sh 60              60 s each
#   tools/fuzz.sh --runs 1000000  a fixed number of executions each instead
#   tools/fuzz.sh --only frame,cobs --bits 64 30
#   tools/fuzz.sh --build-only    just build
#   tools/fuzz.sh --install-deps  apt-get install the toolchain first (Debian/Ubuntu, as root)
#
# Every tests/fuzz/fuzz_NAME.c is a harness. A line "// fuzz-sources: a.c b.c" in it names
# the files of firmware/lib/tpfed/src it links (default: all of them); "// fuzz-flags: ..."
# adds libFuzzer flags. The seed corpus comes from tests/fuzz/gen_corpus.py (the repo's
# Python codec when importable, hand-built bytes otherwise).
#
# Work goes to $TPFED_FUZZ_DIR (default ${TMPDIR:-/tmp}/tpfed-fuzz): bin/, seeds/, corpus/
# (kept between runs, grows) and findings/. Exit status: 0 if no harness found anything,
# 1 on a finding (the reproducer paths are printed), 2 on a usage or build error.
#
# Toolchain (Debian bookworm): clang, libclang-rt-14-dev (libFuzzer, ASan and UBSan runtimes,
# x86_64 and i386) and g++-multilib (32-bit libc/libstdc++ that -m32 links against).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIB="$ROOT/firmware/lib/tpfed"
FUZZ_SRC="$ROOT/tests/fuzz"
WORK="${TPFED_FUZZ_DIR:-${TMPDIR:-/tmp}/tpfed-fuzz}"
CC="${CC:-clang}"
APT_PACKAGES="clang libclang-rt-14-dev g++-multilib"

seconds="${FUZZ_SECONDS:-10}"
runs=""
bits="64 32"
only=""
build_only=0
install_deps=0

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="${2:?--runs needs a count}"; shift ;;
        --runs=*) runs="${1#*=}" ;;
        --seconds) seconds="${2:?--seconds needs a number}"; shift ;;
        --bits) bits="${2:?--bits needs 64, 32 or both}"; shift ;;
        --only) only="${2:?--only needs harness names}"; shift ;;
        --build-only) build_only=1 ;;
        --install-deps) install_deps=1 ;;
        -h|--help) usage; exit 0 ;;
        [0-9]*) seconds="$1" ;;
        *) echo "fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$bits" = both ] && bits="64 32"
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: seconds must be a whole number, got '$seconds'" >&2; exit 2 ;; esac
if [ -n "$runs" ]; then
    case "$runs" in *[!0-9]*) echo "fuzz.sh: --runs must be a whole number, got '$runs'" >&2; exit 2 ;; esac
fi

if [ "$install_deps" = 1 ]; then
    echo "fuzz.sh: apt-get install $APT_PACKAGES"
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $APT_PACKAGES \
        || { echo "fuzz.sh: installing the toolchain failed" >&2; exit 2; }
fi

if ! command -v "$CC" >/dev/null 2>&1; then
    cat >&2 <<EOF
fuzz.sh: '$CC' not found. The fuzz harnesses need clang with the libFuzzer/ASan/UBSan
runtimes, and 32-bit multilib for the -m32 builds. On Debian/Ubuntu:
    sudo apt-get install $APT_PACKAGES
or run: tools/fuzz.sh --install-deps
EOF
    exit 2
fi

harnesses=()
for f in "$FUZZ_SRC"/fuzz_*.c; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .c)"
    name="${name#fuzz_}"
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
    harnesses+=("$name")
done
if [ ${#harnesses[@]} -eq 0 ]; then
    echo "fuzz.sh: no harness selected (tests/fuzz/fuzz_*.c, --only '$only')" >&2
    exit 2
fi

mkdir -p "$WORK/bin" "$WORK/seeds" "$WORK/corpus" "$WORK/findings" "$WORK/logs"

CFLAGS=(-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -g -O1 -std=c99
        -ffp-contract=off -DTPFED_HOST=1 -Wall -Wextra
        -I"$LIB/include" -I"$LIB/src" -I"$FUZZ_SRC")

# --- build -------------------------------------------------------------------------------
build_failed=0
for name in "${harnesses[@]}"; do
    src="$FUZZ_SRC/fuzz_$name.c"
    listed="$(sed -n 's,^// fuzz-sources:,,p' "$src" | head -1)"
    libsrc=()
    if [ -n "$listed" ]; then
        for s in $listed; do libsrc+=("$LIB/src/$s"); done
    else
        libsrc=("$LIB"/src/*.c)
    fi
    for b in $bits; do
        out="$WORK/bin/fuzz_$name.m$b"
        echo "fuzz.sh: build $name (-m$b)"
        log="$WORK/logs/build_$name.m$b.log"
        "$CC" -m"$b" "${CFLAGS[@]}" "$src" "${libsrc[@]}" -o "$out" >"$log" 2>&1
        brc=$?
        if [ "$brc" -ne 0 ] && grep -q "invalid cpu feature string" "$log"; then
            # Older clang (14) knows no __builtin_cpu_supports("f16c"): kernels.c's AVX2
            # dispatch does not compile; build with the reference kernels instead.
            echo "fuzz.sh: note: $CC rejects a __builtin_cpu_supports feature in kernels.c; $name (-m$b) uses the reference kernels (-DTPFED_REFERENCE_ONLY=1)" >&2
            "$CC" -m"$b" "${CFLAGS[@]}" -DTPFED_REFERENCE_ONLY=1 "$src" "${libsrc[@]}" -o "$out" >"$log" 2>&1
            brc=$?
        fi
        if [ "$brc" -ne 0 ]; then
            echo "fuzz.sh: building $name (-m$b) failed:" >&2
            cat "$log" >&2
            if [ "$b" = 32 ] && grep -qE "cannot find|No such file|crt1|stdc\+\+|libclang_rt" "$log"; then
                echo "fuzz.sh: the 32-bit runtimes look missing (need g++-multilib and libclang-rt-14-dev)" >&2
            fi
            build_failed=1
        elif grep -q "warning:" "$log"; then
            grep "warning:" "$log" >&2
        fi
    done
done
[ "$build_failed" = 0 ] || exit 2

# --- seed corpus ---------------------------------------------------------------------------
if command -v python3 >/dev/null 2>&1; then
    python3 "$FUZZ_SRC/gen_corpus.py" "$WORK/seeds" || echo "fuzz.sh: gen_corpus.py failed; fuzzing without seeds" >&2
else
    echo "fuzz.sh: python3 not found; fuzzing without seeds" >&2
fi
[ "$build_only" = 1 ] && { echo "fuzz.sh: built into $WORK/bin"; exit 0; }

# --- run -----------------------------------------------------------------------------------
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

status=0
summary=()
for name in "${harnesses[@]}"; do
    src="$FUZZ_SRC/fuzz_$name.c"
    extra="$(sed -n 's,^// fuzz-flags:,,p' "$src" | head -1)"
    mkdir -p "$WORK/seeds/$name"
    for b in $bits; do
        bin="$WORK/bin/fuzz_$name.m$b"
        corpus="$WORK/corpus/$name"
        mkdir -p "$corpus"
        prefix="$WORK/findings/$name.m$b-"
        log="$WORK/logs/run_$name.m$b.log"
        if [ -n "$runs" ]; then limit=(-runs="$runs"); what="$runs runs"; else limit=(-max_total_time="$seconds"); what="${seconds}s"; fi
        echo "fuzz.sh: run $name (-m$b, $what)"
        before="$(ls "$WORK/findings" | grep -c "^$name.m$b-" || true)"
        # shellcheck disable=SC2086
        "$bin" "${limit[@]}" -timeout=20 -rss_limit_mb=2560 -print_final_stats=1 \
            -artifact_prefix="$prefix" $extra "$corpus" "$WORK/seeds/$name" >"$log" 2>&1
        rc=$?
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
        secs="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
        after="$(ls "$WORK/findings" | grep -c "^$name.m$b-" || true)"
        if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
            status=1
            summary+=("FAIL  $name -m$b: exit $rc after ${execs:-?} executions")
            echo "fuzz.sh: FINDING in $name (-m$b), exit $rc; log: $log" >&2
            grep -E "ERROR|SUMMARY|fuzz check failed|runtime error|differs|reference" "$log" | head -20 >&2
            # The reproducers this run wrote (newest first).
            for a in $(ls -t "$WORK/findings" | grep "^$name.m$b-" | head -$((after - before > 0 ? after - before : 1))); do
                echo "fuzz.sh:   reproducer: $WORK/findings/$a" >&2
                echo "fuzz.sh:   replay:     $bin $WORK/findings/$a" >&2
            done
        else
            summary+=("ok    $name -m$b: ${execs:-?} executions (${secs:-?}/s)")
        fi
    done
done

echo "fuzz.sh: summary"
for s in "${summary[@]}"; do echo "  $s"; done
[ "$status" = 0 ] && echo "fuzz.sh: no findings" || echo "fuzz.sh: findings in $WORK/findings" >&2
exit "$status"
