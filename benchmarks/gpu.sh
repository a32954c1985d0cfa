#!/usr/bin/env bash
# The GPU runs of issue 17 in one command, on one H100/H200, bf16, in at most 8 minutes (FORGE_GPU_BUDGET_S=480:
# a part that could not finish inside the budget is skipped). Parts, in priority order:
#   1. baseline: today's default (ZeRO-2), eager, GPT-2-small shape (d768 H12 L12 T1024 V50304) B16 and
#      ModularForge's default shape (d512 H8 L4 T512 V16384) B32, beside the plain PyTorch loop, with the profile
#      (GPU-busy share, kernel count) and launch-to-first-step;
#   2. the candidate default: ZeRO-0 under DeepSpeed's torch_autocast (ds_configs/zero0_autocast.json: fp32
#      weights, the optimizer unwrapped, no per-parameter overflow scan), the same shapes and batches, profiled;
#   3. larger batches (GPT-2 B32, ModularForge B128) on a synthetic token file (the embedded corpus holds only
#      99 / 198 windows at these shapes: benchmarks/synthetic_tokens.py repeats it), eager and with
#      training.compile: both loops compiled (--compile), and forge_ds compiled against the plain eager loop
#      (--compile_ours);
#   4. DeepCompile (opt-in, "compile": {"deepcompile": true}) at ZeRO-1, ModularForge B128.
# FORGE_GPU_PARTS picks parts by name (default: all, in this order). JSON and the log go to $OUT when set (the
# device tool's output folder), else ./bench-gpu/. The script goes on past a failed part.
# FORGE_GPU_DRY_RUN=1 runs every part on the CPU at a tiny shape, one pair each: the commands, files and options
# are checked without a GPU (bash -n checks only the syntax).
#
#   bash benchmarks/gpu.sh                   # on a machine with the project installed
#   # on a bare lent GPU machine (no registry): build wheels here with ../shared/gpu/make-wheels.sh, carry ".whl":
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
work="${FORGE_GPU_WORK:-/tmp/forge-gpu}"
budget="${FORGE_GPU_BUDGET_S:-480}"
dry="${FORGE_GPU_DRY_RUN:-0}"
slow=1  # the dry run's limits: a shared CPU is slower to start DeepSpeed than a GPU machine is to run a part
parts="${FORGE_GPU_PARTS:-gpt2 modularforge gpt2-autocast modularforge-autocast gpt2-b32-autocast
  modularforge-b128-autocast modularforge-b128-autocast-compile-ours modularforge-b128-autocast-compile
  modularforge-b128-zero1-deepcompile}"
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
begin=$SECONDS

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$(( $2 * slow ))
  shift 2
  [[ " $(echo $parts) " == *" $name "* ]] || return 0  # echo: newlines to spaces
  if (( SECONDS - begin + limit > budget )); then
    echo "=== $name: skipped, it could end past the ${budget}s budget"; return
  fi
  echo "=== $name (limit ${limit}s) at $((SECONDS - begin))s: $*"
  timeout "$limit" "$@"
  echo "=== $name: exit $? at $((SECONDS - begin))s"
}

if [[ "$dry" == 1 ]]; then
  # CPU, tiny: every flag below still reaches bench.py, which is what the dry run checks.
  vocab_gpt2=512 vocab_mf=512 seq_gpt2=64 seq_mf=64
  shape=(--device cpu --precision bf16 --d_model 64 --n_heads 4 --n_layers 2 --d_ff 128 --seq_len 64 --vocab 512)
  timing=(--pairs 1 --steps_per_chunk 1 --warmup 2 --workdir "$work/bench")
  budget=$(( budget > 3600 ? budget : 3600 )) slow=4
else
  vocab_gpt2=50304 vocab_mf=16384 seq_gpt2=1024 seq_mf=512
  shape=(--device cuda --precision bf16)
  timing=(--pairs 4 --steps_per_chunk 8 --warmup 8 --workdir "$work/bench")
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  # DeepSpeed JIT-builds FusedAdam on first use: build for this GPU's architecture only (plain "9.0": DeepSpeed
  # 0.19.8 cannot parse the "9.0a" that CUDA images set; forge_ds's own processes rewrite it the same way).
  export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
fi
python3 -c 'import torch, deepspeed, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'

# One-time costs, overlapped: the FusedAdam build and tokenising the corpus at both vocabularies.
build=""
if [[ "$dry" != 1 ]]; then
  python3 -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()' \
    > "$work/fused_adam_build.log" 2>&1 &
  build=$!
fi
tokenise=()
for v in $(echo "$vocab_gpt2 $vocab_mf" | tr ' ' '\n' | sort -u); do
  python3 -c "import sys; sys.path.insert(0, '.'); from forge_ds import prepare
prepare.prepare('builtin:pydoc', vocab_size=$v, prepared_dir='$work/bench/prepared-v$v', show_progress=False)" &
  tokenise+=($!)
done
wait "${tokenise[@]}"
build_ok=0
[[ -n "$build" ]] && { wait "$build" || build_ok=$?; }
echo "one-time: FusedAdam build + tokenising done at $((SECONDS - begin))s"
# Synthetic token files for the larger batches: 40 steps of B32 at T1024, of B128 at T512.
python3 benchmarks/synthetic_tokens.py "$work/bench/prepared-v$vocab_gpt2" "$work/bench/synthetic-gpt2" \
  --seq_len "$seq_gpt2" --windows $((32 * 40))
python3 benchmarks/synthetic_tokens.py "$work/bench/prepared-v$vocab_mf" "$work/bench/synthetic-mf" \
  --seq_len "$seq_mf" --windows $((128 * 40))

zero2=zero2 zero0ac=zero0_autocast zero1dc="$work/zero1_deepcompile.json"
python3 -c "import json; c = json.load(open('ds_configs/zero1.json')); c['compile'] = {'deepcompile': True}
json.dump(c, open('$zero1dc', 'w'), indent=2)"
if (( build_ok != 0 )); then
  # No FusedAdam (no nvcc, say): measure anyway with torch's AdamW through DeepSpeed, and say so.
  echo "FusedAdam build FAILED ($work/fused_adam_build.log); falling back to torch_adam=true"
  for name in zero2 zero0_autocast; do
    python3 -c "import json; c = json.load(open('ds_configs/$name.json')); c['optimizer']['params']['torch_adam'] = True
json.dump(c, open('$work/${name}_torch_adam.json', 'w'), indent=2)"
  done
  zero2="$work/zero2_torch_adam.json" zero0ac="$work/zero0_autocast_torch_adam.json"
fi
gpt2=(--shape gpt2 "${shape[@]}" "${timing[@]}")
mf=(--shape modularforge "${shape[@]}" "${timing[@]}")
bench=(python3 benchmarks/bench.py)

# 1. today's default, the baseline
part gpt2 75 "${bench[@]}" "${gpt2[@]}" --deepspeed_config "$zero2" --profile --json "$out/gpt2_b16_zero2.json"
part modularforge 90 "${bench[@]}" "${mf[@]}" --deepspeed_config "$zero2" --profile --launch 1 \
  --json "$out/modularforge_b32_zero2.json"
# 2. the candidate default
part gpt2-autocast 75 "${bench[@]}" "${gpt2[@]}" --deepspeed_config "$zero0ac" --profile \
  --json "$out/gpt2_b16_zero0_autocast.json"
part modularforge-autocast 75 "${bench[@]}" "${mf[@]}" --deepspeed_config "$zero0ac" --profile \
  --json "$out/modularforge_b32_zero0_autocast.json"
# 3. larger batches, then compile (ModularForge's shape: 4 layers compile in a fraction of GPT-2's time)
part gpt2-b32-autocast 75 "${bench[@]}" "${gpt2[@]}" --batch_size 32 --prepared_dir "$work/bench/synthetic-gpt2" \
  --deepspeed_config "$zero0ac" --json "$out/gpt2_b32_zero0_autocast.json"
part modularforge-b128-autocast 75 "${bench[@]}" "${mf[@]}" --batch_size 128 --prepared_dir "$work/bench/synthetic-mf" \
  --deepspeed_config "$zero0ac" --json "$out/modularforge_b128_zero0_autocast.json"
part modularforge-b128-autocast-compile-ours 120 "${bench[@]}" "${mf[@]}" --batch_size 128 \
  --prepared_dir "$work/bench/synthetic-mf" --deepspeed_config "$zero0ac" --compile_ours \
  --json "$out/modularforge_b128_zero0_autocast_compile_ours.json"
part modularforge-b128-autocast-compile 150 "${bench[@]}" "${mf[@]}" --batch_size 128 \
  --prepared_dir "$work/bench/synthetic-mf" --deepspeed_config "$zero0ac" --compile \
  --json "$out/modularforge_b128_zero0_autocast_compile.json"
# 4. DeepCompile, opt-in (CUDA only; forge_ds refuses it on a CPU, so the dry run expects exit 2 here)
part modularforge-b128-zero1-deepcompile 120 "${bench[@]}" "${mf[@]}" --batch_size 128 \
  --prepared_dir "$work/bench/synthetic-mf" --deepspeed_config "$zero1dc" \
  --json "$out/modularforge_b128_zero1_deepcompile.json"
echo "total $((SECONDS - begin))s"
