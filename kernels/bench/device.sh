#!/usr/bin/env bash
# The one prepared GPU benchmark: on a machine with a GPU, find the Vulkan loader and driver,
# list the adapters, run `divergen bench kernels` and `divergen bench models` (CLIP ViT-B/32,
# MobileSAM, SAM ViT-B, SD-Turbo's UNet at 512², the SD VAE and TAESD; f32, int8, int4) and write
# everything to ONE file, OUT/device-bench.md: the machine, loader, driver, adapter list, the
# Markdown tables and the raw JSON lines. Sized for about 8 minutes on 16 cores.
#
#   kernels/bench/device.sh [--dry-run] [OUT]      (OUT defaults to $OUT, else ./device-bench)
#
# The binary: $DIVERGEN_BIN if set; else a carried, xz-compressed build at
# .device/divergen.xz (machines that cannot reach crates.io cannot build); else
# `cargo build --release`. --dry-run runs every step at smoke sizes, which fits lavapipe on two
# cores: it checks the script, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out=${1:-${OUT:-device-bench}}
mkdir -p "$out"
report="$out/device-bench.md"
raw=$(mktemp -d)
started=$(date +%s)
say() { printf '%s\n' "$*" | tee -a "$report"; }
step() { echo "== $* ($(($(date +%s) - started)) s)" >&2; }
: >"$report"

# ---- Vulkan loader and driver -------------------------------------------------------------
step "Vulkan loader"
if ! ldconfig -p | grep -q 'libvulkan\.so\.1'; then
  # The lent NVIDIA machines come without the loader; the device tool's README says how to
  # bring its .deb files along in .gl/.
  if compgen -G '.gl/*.deb' >/dev/null; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
fi
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ] && [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
loader=$(ldconfig -p | grep -m1 'libvulkan\.so\.1' | sed 's/.*=> //')
icds=${VK_DRIVER_FILES:-${VK_ICD_FILENAMES:-$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | tr '\n' ' ')}}

say "# divergen device benchmark"
say ""
say "- date: $(date -u +%Y-%m-%dT%H:%MZ)$([ $dry = 1 ] && echo ' (dry run: smoke sizes, not a measurement)')"
say "- host: $(uname -srm), $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
say "- Vulkan loader: ${loader:-none found}"
say "- Vulkan drivers (ICD files): ${icds:-none found}"
if command -v nvidia-smi >/dev/null; then
  say "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
fi

# ---- The binary -----------------------------------------------------------------------------
step "binary"
bin=${DIVERGEN_BIN:-}
if [ -z "$bin" ] && [ -e .device/divergen.xz ]; then
  bin=$raw/divergen
  xz -dc .device/divergen.xz >"$bin" && chmod +x "$bin"
fi
if [ -z "$bin" ]; then
  if ! cargo build --release --locked --bin divergen >"$raw/build.log" 2>&1; then
    say ""
    say "Build failed:"
    say '```'
    tail -20 "$raw/build.log" | tee -a "$report" >/dev/null
    say '```'
    exit 1
  fi
  bin=target/release/divergen
fi
say "- divergen: $("$bin" --version 2>&1)"

# ---- Adapters -------------------------------------------------------------------------------
step "devices"
"$bin" devices --json >"$raw/devices.json" 2>"$raw/devices.err"
devices_rc=$?
say ""
say "## Adapters (\`divergen devices\`)"
say '```'
"$bin" devices 2>&1 | grep -v XDG_RUNTIME_DIR | tee -a "$report" >/dev/null
say '```'
if [ $devices_rc != 0 ] || ! grep -q '"device_type": "\(DiscreteGpu\|IntegratedGpu\|VirtualGpu\)"' "$raw/devices.json"; then
  say ""
  say "**No GPU adapter was found: the figures below (if any) are not GPU measurements.**"
  [ $dry = 1 ] || { cat "$raw/devices.err" >>"$report"; exit 2; }
fi

# ---- Benchmarks -----------------------------------------------------------------------------
run_bench() { # name, seconds, args...
  local name=$1 limit=$2
  shift 2
  step "$name"
  say ""
  say "## $name"
  say ""
  say "\`divergen $*\`"
  say ""
  timeout "$limit" "$bin" "$@" --json --markdown "$raw/$name.md" >"$raw/$name.jsonl" 2>"$raw/$name.err"
  local rc=$?
  [ -e "$raw/$name.md" ] && cat "$raw/$name.md" >>"$report"
  if [ $rc != 0 ]; then
    say ""
    say "(exit $rc$([ $rc = 124 ] && echo ", stopped after $limit s"); last lines of its log:)"
    say '```'
    grep -v XDG_RUNTIME_DIR "$raw/$name.err" | tail -8 | tee -a "$report" >/dev/null
    say '```'
  fi
}

if [ $dry = 1 ]; then
  run_bench kernels 300 bench kernels --quick --filter gemm_f32
  run_bench kernels-register-family 200 --kernels cpu bench kernels --quick --ours-only --filter attention
  run_bench models 300 bench models --model taesd --quant none --runs 1 --sd-size 64
else
  # Ours (the GPU variants the device chose) against burn's default path on the same device.
  run_bench kernels 200 bench kernels
  # The register variants (what lavapipe runs) on the same GPU: what the GPU variants buy.
  run_bench kernels-register-family 80 --kernels cpu bench kernels --ours-only
  run_bench models 150 bench models --model clip-vit-b-32,mobile-sam,sam-vit-b,sd-turbo-unet,sd-vae,taesd --sd-size 512
fi

say ""
say "## Raw JSON lines"
for f in "$raw"/*.jsonl; do
  say ""
  say "### $(basename "$f")"
  say '```json'
  cat "$f" >>"$report"
  say '```'
done
rm -rf "$raw"
step "done: $report"
