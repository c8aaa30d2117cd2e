#!/usr/bin/env bash
# CamEye's CUDA path end to end, as one prepared run for a machine with an NVIDIA GPU (issue 10): this
# project's CI and development machines have none, so this is the check to run where one is lent.
#
#     bash benchmarks/gpu_check.sh                # on CUDA; stops at the first failing step
#     DEVICE=cpu bash benchmarks/gpu_check.sh     # the same steps on the CPU, for the figures beside
#
# 1. a synthetic dataset (400 images) prepared at 128 px; 2. train.py, one epoch with --amp (float16 on
# CUDA), then one more resumed with --compile (Triton on CUDA); 3. eval.py on the test split and caption.py
# on one image, on the device; 4. the decoder-step benchmark on the device (captions/s and matmul peaks);
# 5. batched beam search (images/s). Every step prints its own timing; the whole run takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
if [ "$DEVICE" != cpu ]; then
  $PY -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name(0) if ok else 'no CUDA device'); sys.exit(0 if ok else 1)"
fi
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
step() { echo; echo "== $1"; shift; /usr/bin/env time -f "   %e s wall, %M KB peak" "$@"; }
step "synthetic data" $PY synthetic.py --out "$OUT/synthetic" --num-images 400 --seed 0
step "prepare" $PY create_input_files.py "$OUT/synthetic/dataset_synthetic.json" --out "$OUT/prepared" \
  --min-word-freq 1 --image-size 128
TRAIN=(train.py --data "$OUT/prepared" --out "$OUT/run" --batch-size 16 --embed-dim 128 --attention-dim 128
       --decoder-dim 256 --device "$DEVICE" --amp --no-tensorboard)
step "train epoch 1 (--amp)" $PY "${TRAIN[@]}" --epochs 1
step "train epoch 2 (resumed, --amp --compile)" $PY "${TRAIN[@]}" --epochs 2 --resume --compile
step "eval (test split)" $PY eval.py --checkpoint "$OUT/run/best.pt" --data "$OUT/prepared" --split test \
  --device "$DEVICE" --out "$OUT/eval"
step "caption one image" $PY caption.py "$OUT/synthetic/images/000003.png" --checkpoint "$OUT/run/best.pt" \
  --device "$DEVICE" --out-dir "$OUT/captions"
step "decoder training benchmark" $PY benchmarks/bench_train.py --device "$DEVICE" --repeats 2
step "batched beam search" $PY benchmarks/bench_beam.py --device "$DEVICE"
echo; echo "all steps passed; outputs in $OUT"
