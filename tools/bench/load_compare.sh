#!/usr/bin/env bash
# Model load, whole process and process peak RSS of `ip2p edit` against diffusers, one run after
# the other on the same folder (page cache warm), for the README's loading table.
#
#   tools/bench/load_compare.sh MODEL_DIR IMAGE [RUNS [VARIANT]]
#
# IP2P (default: ip2p on PATH, else target/release/ip2p) and PYTHON (default: the fixture venv's)
# choose the two sides. Each round runs ip2p then diffusers; one Markdown row per run.
set -euo pipefail
model=$1
image=$2
runs=${3:-2}
variant=${4:-}
ip2p=${IP2P:-$(command -v ip2p || echo "${CARGO_TARGET_DIR:-target}/release/ip2p")}
python=${PYTHON:-$HOME/.cache/ip2p/venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# `/usr/bin/time -v` fields: wall clock (h:mm:ss or m:ss) in seconds, peak RSS in MiB.
wall() { awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s}' "$1"; }
peak() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$1"; }

echo "| run | side | model load | whole process | peak RSS MiB |"
echo "|---|---|---:|---:|---:|"
for r in $(seq 1 "$runs"); do
  args=(edit --model "$model" --image "$image" --prompt "make it snowy" --steps 1 --memory-report
    --output "$tmp/out.png")
  [ -n "$variant" ] && args+=(--variant "$variant")
  /usr/bin/time -v "$ip2p" "${args[@]}" >"$tmp/ip2p.out" 2>"$tmp/ip2p.err"
  load=$(cat "$tmp/ip2p.out" "$tmp/ip2p.err" | grep -m1 'model load:' | sed 's/.*model load: //; s/; each part.*/)/' || true)
  echo "| $r | ip2p | ${load:-?} | $(wall "$tmp/ip2p.err") s | $(peak "$tmp/ip2p.err") |"

  /usr/bin/time -v "$python" "$here/diffusers_edit.py" "$model" "$image" 1 $variant \
    >"$tmp/py.out" 2>"$tmp/py.err"
  load=$(grep -oE 'from_pretrained [0-9.]+ s' "$tmp/py.out" | grep -oE '[0-9.]+ s')
  imp=$(grep -oE 'import [0-9.]+ s' "$tmp/py.out" | grep -oE '[0-9.]+ s')
  echo "| $r | diffusers | $load (+$imp import torch) | $(wall "$tmp/py.err") s | $(peak "$tmp/py.err") |"
done
