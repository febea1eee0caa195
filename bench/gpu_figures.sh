#!/usr/bin/env bash
# Every figure of the README's "Speed on a GPU" table, on a CUDA machine, one JSON line per
# measurement appended to ${OUT:-.}/gpu.jsonl (the log of each bench beside it):
#   bash bench/gpu_figures.sh [tests] [trial] [deterministic] [compile] [shared] [overhead]   (all when none named)
# tests: the CUDA-only tests; trial: bench_gpu_trial for ResNet-50, DenseNet-121, ResNet-18
# (224 px, batch 256, bf16 + channels_last, `light` augmentation, CXR-Norm) and the old
# DataLoader path for comparison; deterministic, compile: what deterministic kernels and
# torch.compile change; shared: four ResNet-18 trials at 0.25 GPU each in one Tune search; overhead: a
# ResNet-50 epoch inside a Tune trial against `cxrtune train`.
set -uo pipefail
OUT=${OUT:-.}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
bench() {  # name, script and arguments: the JSON lines to gpu.jsonl, everything to name.log
  local name=$1; shift
  echo "== $name: $*" >&2
  timeout 420 "$PY" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep '^{' "$OUT/$name.log" | tee -a "$OUT/gpu.jsonl"
  grep -E "CXR-Norm of|images on|do not fit|limit .* img/s|trials at|epoch time" "$OUT/$name.log" >&2
  [ $rc -eq 0 ] || { echo "$name failed ($rc):" >&2; tail -20 "$OUT/$name.log" >&2; }
}
parts=${*:-tests trial deterministic compile shared overhead}
for part in $parts; do case $part in
  tests) timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
           tests/test_cxrnorm_torch.py::test_cuda_equals_cpu 2>&1 | tail -15 | tee "$OUT/tests.log" ;;
  trial) bench trial bench/bench_gpu_trial.py resnet50 densenet121 resnet18
         bench trial-dataloader bench/bench_gpu_trial.py resnet50 --pipeline dataloader --set loop.num_workers=8 ;;
  deterministic) bench deterministic bench/bench_gpu_trial.py resnet50 --set loop.deterministic=true ;;
  compile) bench compile bench/bench_gpu_trial.py resnet50 --set loop.compile=true --epochs 4 ;;
  shared) bench shared bench/bench_gpu_trial.py resnet18 --trials 4 --epochs 6 ;;
  overhead) bench overhead bench/bench_tune_overhead.py --image-size 224 --backbone resnet50 --batch 256 \
              --images 6000 --epochs 5 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac; done
