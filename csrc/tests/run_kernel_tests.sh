#!/usr/bin/env bash
# Builds and runs llava_fast_kernel_tests (csrc/tests/kernel_tests.cpp) without Python:
#   1. natively: every kernel table this CPU runs against the scalar one;
#   2. the table files' objects hold no symbol the linker could share with other files (an inline function or
#      template instantiated in a file compiled with AVX-512 flags and kept by the linker for generic code would
#      execute AVX-512 instructions on any CPU);
#   3. cross-compiled for aarch64 (g++-aarch64-linux-gnu) and run under qemu-aarch64-static: QEMU_CPU=max (NEON +
#      dotprod + i8mm: the neon table) and QEMU_CPU=cortex-a53 (ARMv8.0, no dotprod: the scalar table, and the
#      refusal of neon naming the missing feature). Skipped with a note when the cross tools are missing and
#      cannot be installed (apt-get, as root or with passwordless sudo).
# Usage: csrc/tests/run_kernel_tests.sh [build-dir]   (default build/kernel-tests; -j2 builds)
# Cost, measured on a 2-core Xeon shared with other jobs: ~40 s native build + <1 s run; ~50 s cross build +
# ~4 s per qemu run; apt-get install of the cross tools ~60 s once.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/kernel-tests}
jobs=${LLAVA_FAST_BUILD_JOBS:-2}
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)

echo "== kernel tests: native ($(uname -m))"
[ -f "$out/native/CMakeCache.txt" ] || cmake -S . -B "$out/native" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DLLAVA_FAST_PYTHON=OFF -DLLAVA_FAST_BUILD_TESTS=ON >/dev/null
cmake --build "$out/native" --parallel "$jobs" >/dev/null
"$out/native/llava_fast_kernel_tests"

echo "== kernel tests: no shared (vague-linkage) symbols in the ISA table objects"
bad=0 seen=0
for obj in $(find "$out/native" -path '*csrc/isa/*' -name '*.o' \( -name 'avx*' -o -name 'neon*' \)); do
  seen=$((seen + 1))
  shared=$(nm -C --defined-only "$obj" | grep -E ' [WVu] ' || true)
  if [ -n "$shared" ]; then echo "$obj:"; echo "$shared" | head -5; bad=1; fi
done
case "$(uname -m)" in x86_64|aarch64|arm64) [ "$seen" -gt 0 ] || { echo "FAIL: no table objects found"; exit 1; } ;; esac
[ "$bad" = 0 ] && echo "ok ($seen objects)" || { echo "FAIL: give these internal linkage (anonymous namespace / static)"; exit 1; }

echo "== kernel tests: aarch64 under qemu-user"
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      g++-aarch64-linux-gnu qemu-user-static >/dev/null; } || true
fi
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null; then
  [ -f "$out/aarch64/CMakeCache.txt" ] || cmake -S . -B "$out/aarch64" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_TOOLCHAIN_FILE="$PWD/csrc/tests/aarch64-linux-gnu.cmake" -DLLAVA_FAST_PYTHON=OFF \
      -DLLAVA_FAST_BUILD_TESTS=ON >/dev/null
  cmake --build "$out/aarch64" --parallel "$jobs" >/dev/null
  for cpu in max cortex-a53; do
    echo "-- QEMU_CPU=$cpu"
    QEMU_CPU=$cpu qemu-aarch64-static -L /usr/aarch64-linux-gnu "$out/aarch64/llava_fast_kernel_tests"
  done
else
  echo "skipped: g++-aarch64-linux-gnu / qemu-user-static not available (apt-get install them to run this part)"
fi
