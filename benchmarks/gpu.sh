#!/usr/bin/env bash
# The GPU benchmark, one command on a machine with one NVIDIA GPU, about 6 minutes (10 at most):
#   1. model step: MultiMAE-B (ViT-B/16, 224 px, 98 visible tokens), batch 64, bf16 and float32, fused AdamW:
#      samples/s and MFU (of the measured bf16 matmul peak);
#   2. labeling: paper-size teachers built from configs with random weights (DPT-Hybrid and Mask2Former Swin-S at
#      384 px), in-process (--no-ray), 512 images, bf16 and float32;
#   3. trainer throughput: the full step (shard loader + model) vs the model step, ViT-B, batch 64, 12 workers,
#      rgb decoded by the workers and by nvJPEG on the GPU (data.decode_device cpu / cuda);
#   4. labeling host side: null teachers at 256 px, input JPEGs decoded by the CPU vs batched on the GPU (nvJPEG),
#      host CPU ms per sample.
# Each benchmark writes OUT_DIR/<name>.json and .log; OUT_DIR/gpu-results.json gathers them with the device,
# date and commit.
#
#   bash benchmarks/gpu.sh OUT_DIR              # on the GPU machine
#   bash benchmarks/gpu.sh OUT_DIR --dry-run    # the same script on the CPU at toy sizes (tested in the suite)
#
# Python packages the GPU image may lack (webdataset, braceexpand) can travel as wheels in .whl/ at the
# repository root: they are installed into a temporary folder first.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--dry-run]}
mode=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/multimae-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/multimae-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

if [ "$mode" = "--dry-run" ]; then
  model=(--device cpu --size tiny --batch 2 --steps 1 --warmup 1 --image-size 64 --tokens 16 --threads 1)
  label=(--device cpu --no-ray --num 4 --shard-size 4 --size 64 --batch-size 4 --naive-num 1)
  train=(--device cpu --num 16 --batch 2 --workers 0 --steps 1 --warmup 1 --image-size 64 --decode-devices cpu auto)
  host=(--device cpu --num 8 --shard-size 4 --size 64 --batch-size 4 --host-threads 1 --decode-devices cpu)
  export OMP_NUM_THREADS=1
elif [ -n "$mode" ]; then
  echo "gpu.sh: unknown option $mode (only --dry-run)" >&2
  exit 2
else
  model=(--device cuda --size base --batch 64 --steps 20)
  label=(--device cuda --real-size --no-ray --num 512 --shard-size 128 --batch-size 32 --naive-num 16)
  train=(--device cuda --size base --batch 64 --workers 12 --num 1024 --steps 20 --decode-devices cpu cuda)
  host=(--device cuda --num 1024 --shard-size 256 --size 256 --batch-size 64 --host-threads 4 --decode-devices cpu cuda)
fi

bench() {  # name, time limit (s), script and its arguments
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  timeout "$limit" "$PY" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}"
}
bench model_speed 150 benchmarks/model_speed.py "${model[@]}"
bench labeling 200 benchmarks/labeling.py "${label[@]}"
bench train_throughput 150 benchmarks/train_throughput.py "${train[@]}"
bench labeling_host 120 benchmarks/labeling.py --null-teachers "${host[@]}"

"$PY" - "$out" <<'EOF'
import json, os, subprocess, sys, time

out = sys.argv[1]
def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
import torch
results = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "commit": sh(["git", "rev-parse", "--short", "HEAD"]),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "nvidia_smi": sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
}
for name in ("model_speed", "labeling", "train_throughput", "labeling_host"):
    path = os.path.join(out, f"{name}.json")
    results[name] = json.load(open(path)) if os.path.exists(path) else {"error": f"no result: see {name}.log"}
json.dump(results, open(os.path.join(out, "gpu-results.json"), "w"), indent=1)
print(f"gpu.sh: wrote {os.path.join(out, 'gpu-results.json')}")
names = ("model_speed", "labeling", "train_throughput", "labeling_host")
sys.exit(0 if all("error" not in results[n] for n in names) else 1)
EOF
