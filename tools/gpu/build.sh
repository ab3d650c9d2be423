#!/usr/bin/env bash
# Build, on the development machine, what tools/gpu/check.sh runs on a GPU machine that has no
# cargo and no network: `ip2p` and `xtask` (bench and parity) with the CUDA and WGPU backends
# (cubecl-cuda loads the driver and NVRTC at run time), release, stripped and xz-compressed,
# into target/gpu-kit/ (ignored), with the Vulkan loader packages WGPU needs where the GPU
# machine has none. The fixtures travel with the working tree (tracked files), so the kit plus
# the tree stay under the 64 MiB a device call carries.
#
#   tools/gpu/build.sh            # then carry target/gpu-kit and run tools/gpu/check.sh there
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ip2p/target}"
kit=$root/target/gpu-kit
limit_mib=${IP2P_GPU_KIT_LIMIT_MIB:-64}

# cudarc binds the CUDA API of one version; with no toolkit here it would take the newest it
# knows (13.4). 13.0 is what the GPU machine's driver (580) and toolkit provide.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
# Without autotune by default: a cold CUDA process then compiles a few hundred kernels instead of
# many hundreds (the first GPU run, 2026-11-29, compiled 572 kernels in ~330 s, 321 of them matmul
# candidates, and finished no pipeline run). IP2P_GPU_AUTOTUNE=1 builds it in.
features=xtask/flex,xtask/wgpu,xtask/cuda,ip2p-cli/flex,ip2p-cli/wgpu,ip2p-cli/cuda
[ "${IP2P_GPU_AUTOTUNE:-0}" = 1 ] && features=$features,xtask/autotune,ip2p-cli/autotune
echo "== building ip2p and xtask (release; $features; CUDA API $CUDARC_CUDA_VERSION)"
cargo build --release -p xtask -p ip2p-cli --no-default-features --features "$features"

rm -rf "$kit"
mkdir -p "$kit/bin"
for b in ip2p xtask; do
  cp "$CARGO_TARGET_DIR/release/$b" "$kit/bin/$b"
  strip "$kit/bin/$b"
  xz -T0 -6 -f "$kit/bin/$b"
done

echo "== Vulkan loader packages (for WGPU on the GPU machine, if it lacks them)"
mkdir -p "$kit/gl"
lists=$(mktemp -d)
mkdir -p "$lists/partial"
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
if command -v apt-get >/dev/null &&
  apt-get "${apt_opts[@]}" update >/dev/null 2>&1 &&
  (cd "$kit/gl" && apt-get "${apt_opts[@]}" download libvulkan1 >/dev/null 2>&1); then
  ls "$kit/gl"
else
  echo "could not download libvulkan1: check.sh will use the GPU machine's own loader, if any"
fi
rm -rf "$lists"

# Kernels compiled and tuned on an earlier GPU run (check.sh returns them as cubecl-cache.tar.gz):
# put that file in target/gpu-cache/ and the next run starts warm.
if [ -f "$root/target/gpu-cache/cubecl-cache.tar.gz" ]; then
  cp "$root/target/gpu-cache/cubecl-cache.tar.gz" "$kit/"
  echo "kernel cache from an earlier run included"
fi

{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
  cargo --version
  rustc --version
  echo "features: $features"
} >"$kit/BUILD"

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
kit_bytes=$(du -sb "$kit" | cut -f1)
total=$((tree_bytes + kit_bytes))
awk -v k="$kit_bytes" -v t="$tree_bytes" -v l="$limit_mib" 'BEGIN {
  printf "kit %.1f MiB + tracked tree %.1f MiB = %.1f MiB (limit %d MiB)\n", k / 1048576, t / 1048576, (k + t) / 1048576, l }'
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "too large to carry" >&2
  exit 1
fi
echo "ready: carry target/gpu-kit, run tools/gpu/check.sh"
