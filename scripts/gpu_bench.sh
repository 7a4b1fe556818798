#!/usr/bin/env bash
# GPU benchmark of the inference runtime (DALL·E Mini architecture, random weights, onnxruntime CUDA).
#
#   bash scripts/gpu_bench.sh prepare   # here, on the CPU dev machine (needs the .venv with torch)
#   bash scripts/gpu_bench.sh run       # on the GPU machine, from this repo copy; results in $OUT
#
# prepare exports random-weight DALL·E Mini bundles (fp16 and fp32 with the "present" cache
# interface that keeps the KV cache on the GPU, and fp16 with "sample", whose decoder also samples
# on the GPU so each step replays as a CUDA graph) and strips their weights into skeletons under
# .work/gpu/ (a few MB: graphs, tokenizer, manifest template, weight layout). Carry .work/gpu (and
# the .whl/ parts) to the GPU machine. run rebuilds the onnxruntime-gpu wheel from .whl/p*/ortgpu.part*
# if onnxruntime there has no CUDA, installs it into a venv that sees the system site-packages
# (numpy, tokenizers, Pillow, click; CUDA/cuDNN pip libraries if any), fills the skeletons with
# random weights (numpy only: no torch needed there) and runs `bench inference` at batch 1 and 16.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
OUT=${OUT:-$PWD/.work/gpu-out}
SK=.work/gpu

if [ "$mode" = prepare ]; then
  PY=${PY:-.venv/bin/python}
  mkdir -p "$SK" .work/bundles
  $PY -m inference export --random-weights mini --dtype fp16 --out .work/bundles/random-mini-fp16 --overwrite
  $PY -m inference export --random-weights mini --cache present --out .work/bundles/random-mini-present --overwrite
  $PY -m inference export --random-weights mini --dtype fp16 --cache sample --out .work/bundles/random-mini-fp16-sample --overwrite
  rm -rf "$SK/skeleton-fp16" "$SK/skeleton-fp32" "$SK/skeleton-fp16-sample"
  $PY -m inference.skeleton write .work/bundles/random-mini-fp16 "$SK/skeleton-fp16"
  $PY -m inference.skeleton write .work/bundles/random-mini-present "$SK/skeleton-fp32"
  $PY -m inference.skeleton write .work/bundles/random-mini-fp16-sample "$SK/skeleton-fp16-sample"
  du -sh "$SK"
  exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_bench.log") 2>&1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY --version

has_cuda() { "$1" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; }
if ! has_cuda "$PY"; then
  whl=$(ls .whl/onnxruntime_gpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    name=$(awk '{print $2}' .whl/whl.sha256)
    cat .whl/p*/ortgpu.part* > ".whl/$name"
    whl=".whl/$name"
  fi
  (cd .whl && sha256sum -c whl.sha256)
  $PY -m venv --system-site-packages .venv-gpu
  PY=$PWD/.venv-gpu/bin/python
  $PY -m pip install --no-index --no-deps --force-reinstall "$whl"
  has_cuda "$PY" || { echo "onnxruntime-gpu installed but CUDAExecutionProvider is missing"; exit 1; }
fi
$PY -c "import numpy, tokenizers, PIL, click; import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

VARIANTS=${VARIANTS:-fp16-sample fp16 fp32}
for v in $VARIANTS; do
  [ -f ".work/bundles/gpu-mini-$v/manifest.json" ] || $PY -m inference.skeleton materialize "$SK/skeleton-$v" ".work/bundles/gpu-mini-$v"
done

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_mem_mib.log" 2>/dev/null &
smi=$!
for v in $VARIANTS; do
  $PY -m inference bench inference --provider cuda --bundle ".work/bundles/gpu-mini-$v" --batch 1,16 --steps 256 \
      --no-min-dalle --no-small --json-out "$OUT/bench-$v.json" | tee "$OUT/bench-$v.md"
done
$PY -m inference generate "an armchair in the shape of an avocado" --n 4 --seed 1 --provider cuda \
    --model .work/bundles/gpu-mini-fp16-sample --out "$OUT/grid-fp16-sample.png"
kill $smi 2>/dev/null || true
echo "peak GPU memory used (MiB, whole device): $(sort -n "$OUT/gpu_mem_mib.log" | tail -n 1)"
