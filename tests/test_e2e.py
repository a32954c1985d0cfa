"""End to end, real processes: tiny runs at every ZeRO stage, their run directories and their exports.

Each run is made once (module scope) and shared by every assertion about it:
- zero2       2 ranks spawned directly, fp32
- zero3_bf16  2 ranks spawned directly, bf16, every parameter partitioned (the shipped zero3.json keeps parameters
              under 1e5 elements whole on every rank: at this size, all of them)
- launcher    2 ranks through `deepspeed --num_gpus 2 launchers/train_shared.py` (proves --local_rank is accepted)
- single_z1   the `forge-ds` console script as one process, no launcher and no RANK/MASTER variables, ZeRO-1
- single_z0   one process, ZeRO-0 (with the others: ffn_norm checked at every stage)
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, Result, base_env, forge, free_port, read_metrics, train_losses, user_error_line
from forge_ds import config as config_mod
from forge_ds.ds_config import load_ds_config
from forge_ds.model import SharedComponents, contract_keys

pytestmark = pytest.mark.multirank

STEPS = 12
EVERY = 6
D, LAYERS, T, VOCAB, HEADS, BATCH = 32, 2, 32, 300, 4, 4  # TINY's shape

RUNS = {  # name: (how it is launched, ranks, ZeRO stage, extra flags)
    "zero2": ("spawn", 2, 2, ["--deepspeed_config=zero2", "--training.precision=fp32"]),
    "zero3_bf16": ("spawn", 2, 3, ["--deepspeed_config={zero3_nothing_persists}", "--training.precision=bf16"]),
    "launcher": ("deepspeed", 2, 2, ["--deepspeed_config=zero2", "--training.precision=fp32"]),
    "single_z1": ("console", 1, 1, ["--deepspeed_config=zero1", "--training.precision=fp32"]),
    "single_z0": ("spawn", 1, 0, ["--deepspeed_config=zero0", "--training.precision=fp32"]),
}
MAIN_RUNS = ["zero2", "zero3_bf16"]
RUN_FILES = ["config.yaml", "ds_config.json", "tokenizer.json", "metrics.jsonl", "summary.json",
             "shared_components.pt", "shared_components.safetensors", "shared_components.json", "modularforge.yaml",
             "env.txt"]


@dataclass
class Run:
    name: str
    dir: Path
    result: Result
    ranks: int
    stage: int

    @property
    def export(self) -> Path:
        return self.dir / "shared_components.pt"

    def meta(self) -> dict:
        return json.loads((self.dir / "shared_components.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_args(run_dir: Path, prepared: Path, corpus: Path, extra: list[str]) -> list[str]:
    return [*TINY, f"--training.max_steps={STEPS}", f"--training.eval_every={EVERY}",
            f"--training.checkpoint_every={EVERY}", f"--data.source={corpus}", f"--data.prepared_dir={prepared}",
            f"--output_dir={run_dir}", *extra]


def launch(how: str, ranks: int, args: list[str], cwd: Path) -> Result:
    if how == "spawn":
        return forge(["train", *args], ranks=ranks, cwd=cwd)
    bin_dir = Path(sys.executable).parent
    if how == "deepspeed":
        cmd = [shutil.which("deepspeed", path=str(bin_dir)) or "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "launchers/train_shared.py", *args]
        cwd = ROOT  # the README's command, run from the repository root
    else:
        cmd = [shutil.which("forge-ds", path=str(bin_dir)) or "forge-ds", "train", *args]
    started = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=base_env(), capture_output=True, text=True, timeout=300)
    return Result(p.returncode, p.stdout, p.stderr, time.time() - started)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_root, repetitive_corpus):
    """Lazily made runs, each at most once per module: get(name) -> Run."""
    made: dict[str, Run] = {}
    prepared = prepared_root / "e2e-tiny"  # same corpus and vocab everywhere: tokenised once, then reused

    def get(name: str) -> Run:
        if name not in made:
            how, ranks, stage, extra = RUNS[name]
            base = tmp_path_factory.mktemp(name)
            run_dir = base / "run"
            ds = load_ds_config("zero3")
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            (base / "zero3_nothing_persists.json").write_text(json.dumps(ds))
            extra = [flag.format(zero3_nothing_persists=base / "zero3_nothing_persists.json") for flag in extra]
            cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            result = launch(how, ranks, train_args(run_dir, prepared, repetitive_corpus, extra), cwd=base)
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_s = now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime
            print(f"\n[e2e] {name}: exit {result.returncode} in {result.wall_s:.1f} s wall, {cpu_s:.1f} s CPU")
            made[name] = Run(name, run_dir, result, ranks, stage)
        return made[name]

    return get


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, runs) -> Run:
    r = runs(request.param)
    assert r.result.returncode == 0, r.result.output[-4000:]
    return r


@pytest.fixture(scope="module", params=MAIN_RUNS)
def main_run(request, runs) -> Run:
    r = runs(request.param)
    assert r.result.returncode == 0, r.result.output[-4000:]
    return r


# --- every run: the export is the contract ---------------------------------------------------------------------

def test_export_has_exactly_the_contract_keys_as_full_fp32_tensors(run):
    state = torch.load(run.export, map_location="cpu", weights_only=True)
    assert list(state) == contract_keys(LAYERS)
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32 and not tensor.requires_grad, key
        assert tensor.numel() > 0, f"{key} is empty (a ZeRO-3 placeholder)"
        assert torch.isfinite(tensor).all(), key
    assert state["token_embedding.weight"].shape == (VOCAB, D)
    assert state[f"transformer_blocks.{LAYERS - 1}.attention.qkv_proj.weight"].shape == (3 * D, D)


def test_tie_survives_a_weights_only_load(run):
    state = torch.load(run.export, map_location="cpu", weights_only=True)
    assert torch.equal(state["lm_head.weight"], state["token_embedding.weight"])
    assert state["lm_head.weight"].data_ptr() == state["token_embedding.weight"].data_ptr()


def test_ffn_norm_is_exactly_its_init_at_this_zero_stage(run):
    state = torch.load(run.export, map_location="cpu", weights_only=True)
    for l in range(LAYERS):
        assert torch.equal(state[f"transformer_blocks.{l}.ffn_norm.weight"], torch.ones(D)), (run.stage, l)
        assert torch.equal(state[f"transformer_blocks.{l}.ffn_norm.bias"], torch.zeros(D)), (run.stage, l)
    # ... while the parameters that do train have moved from their init.
    assert not torch.equal(state["transformer_blocks.0.attn_norm.weight"], torch.ones(D))


def test_pe_equals_the_formula(run):
    pe = torch.load(run.export, map_location="cpu", weights_only=True)["pos_encoding.pe"]
    expected = torch.zeros(1, T, D, dtype=torch.float64)
    for p in range(T):
        for i in range(0, D, 2):
            angle = p * 10000.0 ** (-i / D)
            expected[0, p, i], expected[0, p, i + 1] = math.sin(angle), math.cos(angle)
    assert pe.shape == (1, T, D)
    assert (pe.double() - expected).abs().max() < 1e-6


def test_strict_weights_only_load_into_a_fresh_shared_module(run):
    state = torch.load(run.export, map_location="cpu", weights_only=True)
    module = SharedComponents(VOCAB, D, HEADS, LAYERS, T, 0.0)
    module.load_state_dict(state, strict=True)
    assert module.lm_head.weight is module.token_embedding.weight
    assert torch.equal(module.token_embedding.weight, state["token_embedding.weight"])


def test_safetensors_holds_the_same_tensors(run):
    from safetensors.torch import load_file

    pt = torch.load(run.export, map_location="cpu", weights_only=True)
    st = load_file(str(run.dir / "shared_components.safetensors"))
    assert set(st) == set(pt)
    for key in pt:
        assert st[key].dtype == torch.float32 and torch.equal(st[key], pt[key]), key


def test_export_equals_deepspeeds_own_zero_to_fp32_reconstruction(run):
    """The live gather (what the export holds) against DeepSpeed's reader of the final checkpoint's shards."""
    final = run.dir / "checkpoints" / f"step-{STEPS:08d}"
    if run.stage == 0:  # no ZeRO partitions: the checkpoint's module states are the fp32 weights
        module = torch.load(final / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        reference = {k: v for k, v in module.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        reference = get_fp32_state_dict_from_zero_checkpoint(str(final.parent), tag=final.name)
    ref = {k.removeprefix("shared."): v for k, v in reference.items() if k.startswith("shared.")}
    state = torch.load(run.export, map_location="cpu", weights_only=True)
    trained = [k for k in state if k != "pos_encoding.pe" and ".ffn_norm." not in k]
    assert set(trained) <= set(ref), sorted(set(trained) - set(ref))
    for key in state:
        if key == "pos_encoding.pe" or key not in ref:  # pe: a buffer DeepSpeed may hold in bf16
            continue
        # Frozen ffn_norm has no fp32 master; DeepSpeed keeps the module's (maybe bf16) copy, exact for ones/zeros.
        assert ref[key].dtype == torch.float32 or ".ffn_norm." in key, key
        assert torch.equal(state[key], ref[key].float()), f"{key}: max diff {(state[key] - ref[key]).abs().max()}"


def test_verify_passes_on_the_export(run):
    if run.ranks == 1:  # the command itself is run on the multi-rank exports; here its check, in-process
        from forge_ds import export as export_mod
        assert export_mod.verify(run.export, n_heads=HEADS) == []
        return
    p = forge(["verify", str(run.export)])
    assert p.returncode == 0, p.output
    assert p.stdout.startswith("OK ")


def test_run_directory_layout(run):
    for name in RUN_FILES:
        assert (run.dir / name).is_file(), name
    assert any((run.dir / "tensorboard").rglob("events.out.tfevents.*"))
    ckpts = run.dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:08d}"
    for step in (EVERY, STEPS):
        assert (ckpts / f"step-{step:08d}" / "COMPLETE").is_file(), step
    assert json.loads((run.dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == run.stage
    assert f"world_size {run.ranks}" in (run.dir / "env.txt").read_text()
    saved = config_mod.load_saved(run.dir / "config.yaml")
    assert saved.training.max_steps == STEPS and saved.model.d_model == D
    # modularforge.yaml is a ModularForge config with the run's model section.
    assert config_mod.resolve(str(run.dir / "modularforge.yaml"))[0].model == saved.model
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert f"shared export written: {run.export}" in run.result.stdout


def test_export_metadata(run):
    meta = run.meta()
    for name in ("shared_components.pt", "shared_components.safetensors"):
        assert meta["sha256"][name] == sha256(run.dir / name), name
    assert meta["tokenizer_sha256"] == sha256(run.dir / "tokenizer.json")
    assert meta["steps"] == STEPS
    assert meta["tokens_seen"] == STEPS * BATCH * run.ranks * T
    assert meta["zero_stage"] == run.stage and meta["world_size"] == run.ranks
    assert meta["model"] == config_mod.load_saved(run.dir / "config.yaml").model.model_dump()
    losses = train_losses(run.dir)
    assert meta["final_train_loss"] == pytest.approx(losses[STEPS])
    assert meta["final_train_ppl"] == pytest.approx(math.exp(meta["final_train_loss"]))
    evals = [m for m in read_metrics(run.dir) if "val/loss" in m]
    assert [m["step"] for m in evals][-1] == STEPS
    assert meta["final_val_loss"] == pytest.approx(evals[-1]["val/loss"])
    assert meta["final_val_ppl"] == pytest.approx(math.exp(meta["final_val_loss"]))
    assert {"torch", "deepspeed", "forge_ds"} <= set(meta["versions"])
    assert meta["versions"]["deepspeed"] == __import__("deepspeed").__version__
    assert meta["keys"] == contract_keys(LAYERS)


# --- the main runs ---------------------------------------------------------------------------------------------

def test_loss_decreased(main_run):
    losses = train_losses(main_run.dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    last3 = sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last3 < losses[1], losses


def test_bf16_run_really_was_bf16_and_exported_fp32(runs):
    r = runs("zero3_bf16")
    assert json.loads((r.dir / "ds_config.json").read_text())["bf16"]["enabled"] is True
    assert r.meta()["precision"] == "bf16"
    # fp32 masters, not 16-bit copies: some trained value is not representable in bf16.
    emb = torch.load(r.export, map_location="cpu", weights_only=True)["token_embedding.weight"]
    assert not torch.equal(emb, emb.to(torch.bfloat16).float())


def test_verify_fails_on_broken_copies(runs, tmp_path):
    from forge_ds import export as export_mod

    good = torch.load(runs("zero2").export, map_location="cpu", weights_only=True)

    def broken(name: str, state: dict) -> Path:
        path = tmp_path / name / "shared_components.pt"
        path.parent.mkdir()
        torch.save(state, path)
        return path

    untied = dict(good)
    untied["lm_head.weight"] = good["lm_head.weight"].clone() + 1e-3
    path = broken("untied", untied)
    p = forge(["verify", str(path)])
    assert p.returncode == 1 and "tie" in p.stdout, p.output

    dropped = {k: v for k, v in good.items() if k != "output_norm.bias"}
    assert any("output_norm.bias" in problem for problem in export_mod.verify(broken("dropped", dropped)))

    moved = dict(good)
    moved["transformer_blocks.1.ffn_norm.weight"] = good["transformer_blocks.1.ffn_norm.weight"] * 0.999
    assert any("transformer_blocks.1.ffn_norm.weight" in problem
               for problem in export_mod.verify(broken("moved", moved)))


def test_finished_run_is_refused_without_overwrite_and_left_untouched(runs, prepared_root, repetitive_corpus):
    r = runs("zero2")

    def files() -> dict:  # run.lock aside: the refused run took the directory's lock first, which names it there
        return {p: (p.stat().st_mtime_ns, sha256(p)) for p in r.dir.rglob("*")
                if p.is_file() and p.name != "run.lock"}

    before = files()
    extra = RUNS["zero2"][3]
    p = forge(["train", *train_args(r.dir, prepared_root / "e2e-tiny", repetitive_corpus, extra)], ranks=1)
    line = user_error_line(p)
    assert "--overwrite" in line and str(r.dir) in line, line
    assert files() == before


def test_single_process_run_needs_no_launcher(runs):
    r = runs("single_z1")
    assert r.result.returncode == 0, r.result.output[-4000:]
    assert "launcher none" in (r.dir / "env.txt").read_text()
    assert "world size 1" in r.result.stdout


def test_deepspeed_launcher_passes_local_rank_and_trains(runs):
    r = runs("launcher")
    assert r.result.returncode == 0, r.result.output[-4000:]
    assert "--local_rank=" in r.result.output  # the launcher really added it
    assert "launcher deepspeed/torchrun" in (r.dir / "env.txt").read_text()
