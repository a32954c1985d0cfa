#!/usr/bin/env bash
# The GPU runs of issues 7 and 9 in one command, on one H100/H200 (bf16, ZeRO-2, the shipped defaults):
#   1. throughput, GPT-2-small shape (d768 H12 L12 T1024 V50304, B16): forge_ds beside the plain PyTorch loop, MFU;
#   2. throughput, ModularForge's default shape (d512 H8 L4 T512 V16384, B32), plus launch-to-first-step;
#   3. the same shapes at the largest batches that fit beside the naive loop's activations (GPT-2 B24, ModularForge
#      B128: the issue's MFU is "at a batch that fits", and the host cost is per step, not per token), then with
#      training.compile=true;
#   4. (if time is left) ModularForge's shape at ZeRO-0, ZeRO-1, ZeRO-2 without overlap_comm; quality at
#      ModularForge's default sizes and training values (lr 3e-4, batch 16, warm-up 200), both recipes.
# FORGE_GPU_PARTS picks parts by name (default: all, in this order).
# JSON and the log go to $OUT when set (the device tool's output folder), else ./bench-gpu/. Each part has a time
# limit and the script goes on past a failed part, so one bad part does not cost the others.
#
#   bash benchmarks/gpu.sh                   # on a machine with the project installed
#   # on a bare lent GPU machine (no registry): build wheels here with ../shared/gpu/make-wheels.sh, carry ".whl":
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
work="${FORGE_GPU_WORK:-/tmp/forge-gpu}"
budget="${FORGE_GPU_BUDGET_S:-420}"  # parts that would start later than this are skipped
parts="${FORGE_GPU_PARTS:-gpt2 modularforge gpt2-b24 modularforge-b128 modularforge-b128-compile gpt2-b24-compile
  modularforge-zero0 modularforge-zero1 modularforge-zero2-no-overlap quality-balanced quality-modularforge}"
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# DeepSpeed JIT-builds FusedAdam on first use: build for this GPU's architecture only (plain "9.0": DeepSpeed
# 0.19.8 cannot parse the "9.0a" that CUDA images set; forge_ds's own processes rewrite it the same way).
export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
begin=$SECONDS

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ " $(echo $parts) " == *" $name "* ]] || return 0  # echo: newlines to spaces
  if (( SECONDS - begin > budget )); then echo "=== $name: skipped, past the ${budget}s budget"; return; fi
  echo "=== $name (limit ${limit}s) at $((SECONDS - begin))s: $*"
  timeout "$limit" "$@"
  echo "=== $name: exit $? at $((SECONDS - begin))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c 'import torch, deepspeed, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'

# One-time costs, overlapped: the FusedAdam build and tokenising the corpus at both vocabularies.
python3 -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()' \
  > "$work/fused_adam_build.log" 2>&1 &
build=$!
tokenise=()
for v in 50304 16384; do
  python3 -c "import sys; sys.path.insert(0, '.'); from forge_ds import prepare
prepare.prepare('builtin:pydoc', vocab_size=$v, prepared_dir='$work/bench/prepared-v$v', show_progress=False)" &
  tokenise+=($!)
done
wait "${tokenise[@]}"
build_ok=0
wait "$build" || build_ok=$?
echo "one-time: FusedAdam build + tokenising done at $((SECONDS - begin))s"; tail -3 "$work/fused_adam_build.log"
ds=zero2
if (( build_ok != 0 )); then
  # No FusedAdam (no nvcc, say): measure anyway with torch's AdamW through DeepSpeed, and say so.
  echo "FusedAdam build FAILED (log above); falling back to torch_adam=true"
  python3 -c "import json; c = json.load(open('ds_configs/zero2.json')); c['optimizer']['params']['torch_adam'] = True
json.dump(c, open('$work/zero2_torch_adam.json', 'w'), indent=2)"
  ds="$work/zero2_torch_adam.json"
fi

common=(--precision bf16 --pairs 5 --steps_per_chunk 10 --warmup 10 --workdir "$work/bench")
part gpt2 150 python3 benchmarks/bench.py --shape gpt2 "${common[@]}" --zero 2 --deepspeed_config "$ds" --profile \
  --json "$out/gpt2_bf16_z2.json"
part modularforge 150 python3 benchmarks/bench.py --shape modularforge "${common[@]}" --zero 2 --deepspeed_config "$ds" \
  --launch 1 --profile --json "$out/modularforge_bf16_z2.json"

# Larger batches. Peak allocated memory at the batches above (H100, 2026-11-25): GPT-2 B16 20.5 GB forge_ds /
# 38.3 GB naive loop, ModularForge B32 5.4 / 7.5 GB; activations grow with the batch, so these fit in 80 GB beside
# the naive loop, and the embedded corpus has more windows than one batch (ModularForge B256 would not).
part gpt2-b24 150 python3 benchmarks/bench.py --shape gpt2 --batch_size 24 "${common[@]}" --zero 2 \
  --deepspeed_config "$ds" --profile --json "$out/gpt2_b24_bf16_z2.json"
part modularforge-b128 150 python3 benchmarks/bench.py --shape modularforge --batch_size 128 "${common[@]}" --zero 2 \
  --deepspeed_config "$ds" --profile --json "$out/modularforge_b128_bf16_z2.json"
part modularforge-b128-compile 180 python3 benchmarks/bench.py --shape modularforge --batch_size 128 "${common[@]}" \
  --zero 2 --deepspeed_config "$ds" --compile --json "$out/modularforge_b128_bf16_z2_compile.json"
part gpt2-b24-compile 180 python3 benchmarks/bench.py --shape gpt2 --batch_size 24 "${common[@]}" --zero 2 \
  --deepspeed_config "$ds" --compile --json "$out/gpt2_b24_bf16_z2_compile.json"

# What the ZeRO stage and its settings cost on one GPU, where nothing is partitioned anyway.
python3 -c "import json; c = json.load(open('ds_configs/zero2.json')); c['zero_optimization']['overlap_comm'] = False
json.dump(c, open('$work/zero2_no_overlap.json', 'w'), indent=2)"
quick=(--pairs 3 --precision bf16 --steps_per_chunk 10 --warmup 10 --workdir "$work/bench" --shape modularforge)
part modularforge-zero0 90 python3 benchmarks/bench.py "${quick[@]}" --zero 0 --json "$out/modularforge_bf16_z0.json"
part modularforge-zero1 90 python3 benchmarks/bench.py "${quick[@]}" --zero 1 --json "$out/modularforge_bf16_z1.json"
part modularforge-zero2-no-overlap 90 python3 benchmarks/bench.py "${quick[@]}" --zero 2 \
  --deepspeed_config "$work/zero2_no_overlap.json" --json "$out/modularforge_bf16_z2_no_overlap.json"

# ModularForge's configs/default.yaml sizes and training values; a 500-step schedule (ModularForge's 3 epochs
# would be 45 steps of pydoc at T512), validation every 50 steps.
mf=(--model.d_model=512 --model.n_heads=8 --model.n_layers=4 --model.d_ff=2048 --model.vocab_size=16384
    --model.max_seq_len=512 --training.learning_rate=3e-4 --training.warmup_steps=200 --training.device=cuda
    --training.precision=bf16 --training.eval_every=50)
for recipe in balanced modularforge; do
  part "quality-$recipe" 120 python3 benchmarks/quality.py --steps 500 --recipe "$recipe" --zero 2 \
    --workdir "$work/quality" --tag "mfsize-$recipe" --json "$out/quality_mfsize_$recipe.json" "${mf[@]}"
done
echo "total $((SECONDS - begin))s"
