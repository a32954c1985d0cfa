#!/usr/bin/env bash
# The GPU throughput runs of issue 7 in one command (one H100/H200, bf16, ZeRO-2): the GPT-2-small shape and
# ModularForge's default shape, each beside the plain PyTorch loop, then the launch-to-first-step time.
# JSON files go to $OUT when set (the device tool's output folder), else ./bench-gpu/.
#
#   bash benchmarks/gpu.sh                   # on a machine with the project installed
#   # on a bare lent GPU machine (no registry): build wheels once here with ../shared/gpu/make-wheels.sh, carry
#   # ".whl", and run:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# GPT-2 small: d768 H12 L12 T1024 V50304 (target MFU >= 50%); batch 16 per GPU fits easily on 80 GB.
python3 benchmarks/bench.py --shape gpt2 --precision bf16 --zero 2 --pairs 5 --steps_per_chunk 10 --warmup 10 \
  --json "$out/gpt2_bf16_z2.json" "$@"
# ModularForge default: d512 H8 L4 T512 V16384 (target MFU >= 30%).
python3 benchmarks/bench.py --shape modularforge --precision bf16 --zero 2 --pairs 5 --steps_per_chunk 10 \
  --warmup 10 --launch 2 --json "$out/modularforge_bf16_z2.json" "$@"
