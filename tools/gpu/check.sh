#!/usr/bin/env bash
# The GPU check. On a GPU machine, from the working tree, with target/gpu-kit carried
# (tools/gpu/build.sh makes it on the development machine; the GPU machine has no cargo):
#
#   tools/gpu/check.sh [--pack]     # results in $OUT (default target/gpu-check)
#   tools/gpu/check.sh --dry-run    # anywhere: no device is used, every GPU step says skipped
#
# Steps, each bounded in time (the whole within $IP2P_GPU_BUDGET_S, default 330 s):
#   1. env          nvidia-smi, driver and CUDA versions, where NVRTC and libcuda were looked for
#   2. cuda-parity  the pipeline parity fixtures (tiny, wide; Euler, DDIM) on CUDA in f32, f16 and
#                   bf16, fused and naive attention, f32 also against the CPU backend
#   3. cuda-bench   SD 1.5 preset at 512², 20 steps, batch 1 and 4, f32 and f16: per stage, it/s of
#                   the 3-way UNet step, first run (JIT + autotune), pool peak memory
#   4. cuda-edit    the `ip2p edit` command on the tiny model, on CUDA
#   5. wgpu-bench, wgpu-parity   the same GPU through WGPU/Vulkan, when wgpu finds an adapter
# and a summary: summary.md and summary.json. With --pack, $OUT holds only those two files and
# gpu-check.tar.gz of the rest (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

dry=0
pack=0
for a in "$@"; do
  case $a in
  --dry-run) dry=1 ;;
  --pack) pack=1 ;;
  *)
    echo "usage: $0 [--dry-run] [--pack]" >&2
    exit 2
    ;;
  esac
done

OUT=${OUT:-$root/target/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$OUT/gpu-check
rm -rf "$work"
mkdir -p "$work"
kit=${IP2P_GPU_KIT:-$root/target/gpu-kit}
budget=${IP2P_GPU_BUDGET_S:-330}
export IP2P_WORKSPACE=$root
export RUST_BACKTRACE=1
start=$(date +%s)
steps=$work/steps.tsv
: >"$steps"

# record NAME STATUS SECONDS DETAIL
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ')" >>"$steps"
  echo "-- $1: $2 (${3} s)${4:+: $4}"
}

elapsed() { echo $(($(date +%s) - start)); }

# IP2P_GPU_ONLY="step ..." runs only those steps (a rerun for what the first run left).
selected() { [ -z "${IP2P_GPU_ONLY:-}" ] || [[ " $IP2P_GPU_ONLY " == *" $1 "* ]]; }

# run_step NAME LIMIT_S CMD...: output in NAME.log; the limit is capped by the budget left.
# Status: the command's exit, then what the report it wrote says (all cases skipped: skipped).
run_step() {
  local name=$1 limit=$2
  shift 2
  if ! selected "$name"; then
    record "$name" skipped 0 "not in IP2P_GPU_ONLY"
    return
  fi
  local left=$((budget - $(elapsed)))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "the time budget (${budget} s) is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 rc dt
  t0=$(date +%s)
  # From $work, where CubeCL finds its cubecl.toml (fixtures come from $IP2P_WORKSPACE).
  (cd "$work" && timeout --kill-after=10 "$limit" "$@") >"$work/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail -n 40 "$work/$name.log"
  case $rc in
  0)
    local json
    json=$(ls "$work/$name"/*.json 2>/dev/null | head -1)
    if [ -n "$json" ] && ! grep -q '"status": "ok"' "$json" && grep -q '"status": "skipped"' "$json"; then
      record "$name" skipped "$dt" "$(grep -m1 -o '"reason": "[^"]*"' "$json" | cut -d'"' -f4)"
    else
      record "$name" ok "$dt" ""
    fi
    ;;
  124 | 137) record "$name" failed "$dt" "timed out after ${limit} s (see $name.log)" ;;
  *) record "$name" failed "$dt" "exit $rc: $(grep -v '^[[:space:]]*$' "$work/$name.log" | tail -1 | cut -c1-300)" ;;
  esac
}

# ---------------------------------------------------------------- 1. environment
gpu=0
# A dry run hides every device from CUDA (and from xtask, which then reports skipped).
[ "$dry" = 1 ] && export CUDA_VISIBLE_DEVICES=""
if [ "$dry" = 0 ] && { [ -e /dev/nvidiactl ] || nvidia-smi -L >/dev/null 2>&1; }; then
  gpu=1
fi

# cudarc (inside cubecl-cuda) dlopens libcuda.so(.1) and libnvrtc.so(.N) through the dynamic
# loader. Look where toolkits and pip wheels put them; a folder the loader does not search goes
# on LD_LIBRARY_PATH, and a versioned-only libnvrtc gets an unversioned link.
nvrtc_dirs=()
ldp=${LD_LIBRARY_PATH:-}
for d in ${ldp//:/ } ${CUDA_PATH:+$CUDA_PATH/lib64} ${CUDA_HOME:+$CUDA_HOME/lib64} \
  /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
  /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
  [ -d "$d" ] && nvrtc_dirs+=("$d")
done
if command -v python3 >/dev/null; then
  for d in $(python3 -c 'import nvidia, sys; print(*nvidia.__path__)' 2>/dev/null); do
    while IFS= read -r f; do nvrtc_dirs+=("$(dirname "$f")"); done < <(find "$d" -name 'libnvrtc.so*' 2>/dev/null)
  done
fi
{
  echo "# GPU check environment"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "kit: $(cat "$kit/BUILD" 2>/dev/null | head -2 | tr '\n' ' ' || echo none)"
  echo "dry run: $dry; NVIDIA device: $gpu"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    nvidia-smi 2>&1 | grep -m1 "CUDA Version" | sed 's/|//g; s/  */ /g'
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "ldconfig: $(ldconfig -p 2>/dev/null | grep -oE '(libnvrtc|libcuda)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
  for d in "${nvrtc_dirs[@]}"; do
    echo "looked for NVRTC/libcuda in $d: $(cd "$d" && ls libnvrtc.so* libcuda.so* 2>/dev/null | tr '\n' ' ')"
  done
} >"$work/env.txt" 2>&1

if [ "$gpu" = 1 ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so '; then
  for d in "${nvrtc_dirs[@]}"; do
    f=$(ls "$d"/libnvrtc.so* 2>/dev/null | grep -v alt | head -1)
    [ -n "$f" ] || continue
    links=/tmp/ip2p-nvrtc
    mkdir -p "$links"
    ln -sf "$f" "$links/libnvrtc.so"
    export LD_LIBRARY_PATH="$links:$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NVRTC: using $f (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >>"$work/env.txt"
    break
  done
fi
if [ -d /usr/local/nvidia/lib64 ] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
  export LD_LIBRARY_PATH="/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libcuda: adding /usr/local/nvidia/lib64" >>"$work/env.txt"
fi
cat "$work/env.txt"
record env ok "$(elapsed)" "$( (nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no NVIDIA device') | head -1)"

# ---------------------------------------------------------------- the binaries
bin=${IP2P_GPU_BIN:-}
if [ -z "$bin" ] && [ -f "$kit/bin/xtask.xz" ]; then
  bin=/tmp/ip2p-gpu-kit/bin
  mkdir -p "$bin"
  for b in xtask ip2p; do
    [ -f "$kit/bin/$b.xz" ] || continue
    if command -v xz >/dev/null; then
      xz -dc "$kit/bin/$b.xz" >"$bin/$b"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$kit/bin/$b.xz" "$bin/$b"
    fi
    chmod +x "$bin/$b"
  done
fi
have() { [ -n "$bin" ] && [ -x "$bin/$1" ]; }
no_bin="no $kit/bin (run tools/gpu/build.sh on the development machine and carry target/gpu-kit)"

# ---------------------------------------------------------------- 2-4. CUDA
# CubeCL compiles every kernel with NVRTC on first use and autotunes matmuls and reductions;
# both dominate a cold process. Compiled kernels and autotune results are cached on disk so
# that each step after the first reuses them; its compilation and autotune log goes to
# cubecl.log. CUBECL_AUTOTUNE_LEVEL (default here: minimal) trades tuning time for speed.
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
cache=${IP2P_CUBECL_CACHE:-/tmp/ip2p-cubecl-cache}
mkdir -p "$cache"
if [ -f "$kit/cubecl-cache.tar.gz" ]; then
  tar xzf "$kit/cubecl-cache.tar.gz" -C "$cache" && echo "kernel cache: unpacked from the kit" >>"$work/env.txt"
fi
cat >"$work/cubecl.toml" <<TOML
[compilation]
cache = { file = "$cache/compilation" }
[compilation.logger]
level = "basic"
file = "$work/cubecl.log"
[autotune]
cache = { file = "$cache/autotune" }
[autotune.logger]
level = "minimal"
file = "$work/cubecl.log"
TOML
# A sampler: kernels compiled so far and the GPU's load, every 10 s (progress.txt).
if [ "$gpu" = 1 ]; then
  (
    while sleep 10; do
      printf '%s s: %s log lines; GPU %s\n' "$(elapsed)" "$(cat "$work/cubecl.log" 2>/dev/null | wc -l)" \
        "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
    done
  ) >"$work/progress.txt" 2>&1 &
  sampler=$!
fi

# Warm phase: NVRTC compiles one kernel at a time per process (~0.6 s each on the H200 host), so
# a cold sequential run spends minutes compiling. Every CUDA command below first runs once, all
# at the same time in separate processes (2 steps for the benches), filling the shared on-disk
# cache (cubecl's cache files are multi-process safe); the timed steps after it start warm. Its
# wall time is the cold-start cost, reported as the `warm` step (per command in warm.txt).
warm() {
  local limit=${IP2P_GPU_WARM_S:-240} t0 pids=() i rc
  local left=$((budget - $(elapsed)))
  [ "$limit" -gt $((left - 60)) ] && limit=$((left - 60))
  if [ "$limit" -lt 30 ]; then
    record warm skipped 0 "the time budget (${budget} s) is spent"
    return
  fi
  echo "== warm (limit ${limit} s): every CUDA command once, in parallel"
  t0=$(date +%s)
  mkdir -p "$work/warm"
  local jobs=${IP2P_GPU_WARM_JOBS:-parity-f32 parity-f16 parity-bf16 bench-f16-1 bench-f32-1 bench-f16-4 bench-f32-4 edit}
  for job in $jobs; do
    (
      cd "$work" || exit 1
      s=$(date +%s)
      case $job in
      parity-*) timeout --kill-after=10 "$limit" "$bin/xtask" parity --backend cuda --dtype "${job#parity-}" \
        --attention fused,naive --out "$work/warm/$job" ;;
      bench-*)
        a=${job#bench-}
        timeout --kill-after=10 "$limit" "$bin/xtask" bench --backend cuda --preset sd15 --resolution 512 \
          --steps 2 --batch "${a#*-}" --dtype "${a%-*}" --path full-cycle --warmup 0 --repeats 1 --quiet \
          --out "$work/warm/$job"
        ;;
      edit) have ip2p && timeout --kill-after=10 "$limit" "$bin/ip2p" edit --model "$root/fixtures/models/tiny" \
        --image "$root/fixtures/vae/src.png" --prompt "make it snowy" --steps 2 --backend cuda --quiet \
        --output "$work/warm/edit.png" ;;
      esac
      echo "$job exit $? in $(($(date +%s) - s)) s" >"$work/warm/$job.status"
    ) >"$work/warm/$job.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; done
  cat "$work"/warm/*.status >"$work/warm.txt" 2>/dev/null
  cat "$work/warm.txt"
  rc=ok
  grep -qv ' exit 0 ' "$work/warm.txt" && rc=failed
  record warm "$rc" "$(($(date +%s) - t0))" "$(tr '\n' ';' <"$work/warm.txt")"
}

bench() { # NAME DTYPE BATCH
  run_step "$1" 150 "$bin/xtask" bench --backend cuda --preset sd15 --resolution 512 --steps 20 \
    --batch "$3" --dtype "$2" --path full-cycle --warmup 1 --repeats 1 --quiet --out "$work/$1"
}
if have xtask; then
  # Without a device (or in a dry run) xtask itself reports every case and cell as skipped, and
  # this still proves the command lines and the report plumbing. In order of what matters most
  # if the budget runs out: one small case (does CUDA work at all), the f16 speed, parity, f32.
  [ "$gpu" = 1 ] || echo "CUDA steps: no device, xtask reports them skipped"
  if [ "$gpu" = 1 ] && [ "${IP2P_GPU_WARM:-1}" = 1 ] && selected warm; then warm; else record warm skipped 0 "no NVIDIA device, or not selected"; fi
  run_step cuda-smoke 100 "$bin/xtask" parity --backend cuda --fixture tiny_euler-noguidance --dtype f32 \
    --attention naive --out "$work/cuda-smoke"
  bench cuda-bench-f16-b1 f16 1
  run_step cuda-parity 150 "$bin/xtask" parity --backend cuda --dtype f32,f16,bf16 --attention fused,naive \
    --vs-cpu --out "$work/cuda-parity"
  bench cuda-bench-f32-b1 f32 1
  bench cuda-bench-f16-b4 f16 4
  bench cuda-bench-f32-b4 f32 4
else
  for s in cuda-smoke cuda-bench-f16-b1 cuda-parity cuda-bench-f32-b1 cuda-bench-f16-b4 cuda-bench-f32-b4; do
    record "$s" skipped 0 "$no_bin"
  done
fi
if [ "$gpu" = 1 ] && have ip2p; then
  run_step cuda-edit 60 "$bin/ip2p" edit --model "$root/fixtures/models/tiny" --image "$root/fixtures/vae/src.png" \
    --prompt "make it snowy" --steps 10 --backend cuda --quiet --output "$work/cuda-edit.png"
elif have ip2p; then
  record cuda-edit skipped 0 "no NVIDIA device"
else
  record cuda-edit skipped 0 "$no_bin"
fi

# ---------------------------------------------------------------- diffusers on the same GPU
# The reference on the same GPU, when the machine has a Python with torch (CUDA), diffusers and
# transformers: tools/bench/diffusers_bench.py, the same SD 1.5 architecture with random
# weights, 512², 20 Euler-ancestral steps with 3-way guidance, batch 1, f16 and f32.
torch_python() {
  local p
  for p in ${IP2P_GPU_PYTHON:-} /opt/*/.venv/bin/python /opt/*/bin/python3 python3; do
    { [ -x "$p" ] || command -v "$p" >/dev/null 2>&1; } || continue
    "$p" -c 'import torch, diffusers, transformers; assert torch.cuda.is_available()' >/dev/null 2>&1 &&
      { echo "$p"; return; }
  done
}
py=""
[ "$gpu" = 1 ] && py=$(torch_python)
for dt in f16 f32; do
  name=diffusers-cuda-$dt
  if [ -n "$py" ]; then
    mkdir -p "$work/$name"
    run_step "$name" 120 bash -c "'$py' '$root/tools/bench/diffusers_bench.py' --preset sd15 --height 512 \
      --width 512 --steps 20 --batch 1 --warmup 1 --repeats 1 --paths full-cycle --device cuda \
      --dtype $dt > '$work/$name/diffusers.json'"
  else
    record "$name" skipped 0 "no Python with torch (CUDA), diffusers and transformers here"
  fi
done

# ---------------------------------------------------------------- 5. WGPU on the same GPU
if [ "$gpu" = 1 ] && have xtask; then
  if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && ls "$kit"/gl/*.deb >/dev/null 2>&1; then
    for f in "$kit"/gl/*.deb; do dpkg -x "$f" / 2>>"$work/env.txt"; done
    ldconfig 2>/dev/null
    echo "Vulkan loader unpacked from the kit" >>"$work/env.txt"
  fi
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$icd" ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=$icd
  fi
  if ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then
    run_step wgpu-bench 120 "$bin/xtask" bench --backend wgpu --preset sd15 --resolution 512 \
      --steps 20 --batch 1 --dtype f32 --path full-cycle --warmup 1 --repeats 1 --quiet \
      --out "$work/wgpu-bench"
    run_step wgpu-parity 90 "$bin/xtask" parity --backend wgpu --dtype f32 \
      --fixture tiny_euler,wide_euler --vs-cpu --out "$work/wgpu-parity"
  else
    record wgpu-bench skipped 0 "no Vulkan loader (libvulkan.so.1)"
    record wgpu-parity skipped 0 "no Vulkan loader (libvulkan.so.1)"
  fi
else
  why="no NVIDIA device"
  have xtask || why=$no_bin
  record wgpu-bench skipped 0 "$why"
  record wgpu-parity skipped 0 "$why"
fi

# ---------------------------------------------------------------- summary
json_str() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | awk 'BEGIN{ORS=""} {if (NR>1) print "\\n"; print}'; }
json_file() { if [ -s "$1" ]; then cat "$1"; else echo null; fi; }
first_json() { ls "$work/$1"/*.json 2>/dev/null | grep -v chart | head -1; }
{
  echo "{"
  echo "  \"dry_run\": $([ "$dry" = 1 ] && echo true || echo false),"
  echo "  \"gpu\": $([ "$gpu" = 1 ] && echo true || echo false),"
  echo "  \"wall_s\": $(elapsed),"
  echo "  \"env\": \"$(json_str "$(cat "$work/env.txt")")\","
  echo "  \"steps\": ["
  n=$(wc -l <"$steps")
  i=0
  while IFS=$'\t' read -r name status secs detail; do
    i=$((i + 1))
    sep=","
    [ "$i" = "$n" ] && sep=""
    echo "    {\"name\": \"$name\", \"status\": \"$status\", \"seconds\": $secs, \"detail\": \"$(json_str "$detail")\"}$sep"
  done <"$steps"
  echo "  ],"
  echo "  \"reports\": {"
  first=1
  while IFS=$'\t' read -r name _; do
    f=$(first_json "$name")
    [ -n "$f" ] || continue
    [ "$first" = 1 ] || echo ","
    first=0
    printf '    "%s": %s' "$name" "$(cat "$f")"
  done <"$steps"
  echo
  echo "  }"
  echo "}"
} >"$work/summary.json"

{
  echo "# ip2p GPU check"
  echo
  echo "\`tools/gpu/check.sh $*\`, $(elapsed) s. Dry run: $([ "$dry" = 1 ] && echo yes || echo no)."
  echo
  echo '```'
  cat "$work/env.txt"
  echo '```'
  echo
  echo "| step | status | s | detail |"
  echo "|---|---|---:|---|"
  while IFS=$'\t' read -r name status secs detail; do
    echo "| $name | $status | $secs | ${detail//|//} |"
  done <"$steps"
  while IFS=$'\t' read -r name _; do
    [ -s "$work/$name/diffusers.json" ] && { echo; echo "## $name"; echo; echo '```'; cat "$work/$name/diffusers.json"; echo '```'; }
    for f in "$work/$name/parity.md" "$work/$name/report.md"; do
      [ -f "$f" ] && { echo; echo "## $name"; echo; tail -n +2 "$f" | grep -v '^## Notes' ; }
    done
  done <"$steps"
  [ -f "$work/progress.txt" ] && { echo; echo "## progress (kernels compiled, GPU load)"; echo; echo '```'; tail -n 60 "$work/progress.txt"; echo '```'; }
} >"$work/summary.md"

[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
# The compilation log can be large: keep its head and tail.
if [ -f "$work/cubecl.log" ] && [ "$(stat -c %s "$work/cubecl.log")" -gt 4000000 ]; then
  { head -c 1000000 "$work/cubecl.log"; echo; echo "[... cut ...]"; tail -c 2000000 "$work/cubecl.log"; } >"$work/cubecl.log.cut"
  mv "$work/cubecl.log.cut" "$work/cubecl.log"
fi
cp "$work/summary.md" "$work/summary.json" "$OUT/"
# The compiled PTX and autotune results, for the next run (tools/gpu/build.sh carries them).
if [ "$gpu" = 1 ] && [ -n "$(ls -A "$cache" 2>/dev/null)" ]; then
  tar czf "$OUT/cubecl-cache.tar.gz" -C "$cache" . &&
    [ "$(stat -c %s "$OUT/cubecl-cache.tar.gz")" -gt 16000000 ] && rm -f "$OUT/cubecl-cache.tar.gz"
fi
# Failed steps fail the check; skipped ones do not (read before --pack removes the steps).
failed=$(cut -f2 "$steps" | grep -cx failed)
if [ "$pack" = 1 ]; then
  tar czf "$OUT/gpu-check.tar.gz" -C "$OUT" gpu-check && rm -rf "$work"
fi
echo
cat "$OUT/summary.md"
[ "$failed" = 0 ]
