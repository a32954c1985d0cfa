"""Checkpoints you can trust, with real processes: bit-exact resume at every ZeRO stage, resume at another world size
(DeepSpeed's universal checkpoint), a SIGKILL in the middle of a save, keep-N and export=best, the offline export,
checksums, warm start from an export, and resumes that must be refused.

Every run trains the TINY model for 2N steps in fp32 on CPU, with dropout on, and is made once per module:
- straight[k]  2 ranks, ZeRO-k, 2N steps straight (checkpoints at N and 2N)
- split[k]     2 ranks, ZeRO-k, `--stop_after_steps=N`, then `--resume` to the end. ZeRO-1's resume is first killed
               (SIGKILL of rank 1 in its last save), then resumed again: the promise holds across a crash too.
               ZeRO-2's resume also checkpoints every step with keep_checkpoints=2 and loads its batches in 2
               worker processes (safe changes on resume).
- 2->1 / 1->2  at ZeRO-2 and ZeRO-3: straight[k]'s step-N checkpoint resumed on 1 rank with twice the gradient
               accumulation; that run's step-(N+1) checkpoint resumed on 2 ranks again.
- warm         1 rank, ZeRO-0, --init_from=straight[2]'s export, export=best with keep_checkpoints=1.
Dropout's masks are seeded per (step, micro-batch slot in the global batch), so the same samples get the same masks
at any world size: the world-size tests can share the dropout runs and still compare losses to 1e-4.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ERROR, TINY, Result, forge, read_metrics, train_losses, user_error_line
from forge_ds import data
from forge_ds.model import SharedTrainingModel, contract_keys, initialize, sinusoidal_table
from forge_ds.evaluate import get_batch
from ranks import spawn_ranks

pytestmark = pytest.mark.multirank

N = 3  # steps before the interruption; every run's schedule is 2N steps
# Two ranks on two shared cores: more intra-op threads per rank only fight each other (10x slower steps here).
ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class Run:
    dir: Path
    results: list[Result]  # one per invocation, in order

    @property
    def export(self) -> Path:
        return self.dir / "shared_components.pt"

    def ckpt(self, step: int) -> Path:
        return self.dir / "checkpoints" / f"step-{step:08d}"


def train_args(run_dir: Path, corpus: Path, prepared: Path, stage: int, *extra: str) -> list[str]:
    """The common flags, then `extra`; a flag given again replaces the earlier value."""
    flags = {}
    for flag in [*TINY, f"--training.max_steps={2 * N}", f"--training.checkpoint_every={N}",
                 "--training.eval_every=1000", "--training.eval_max_batches=2", "--training.precision=fp32",
                 "--training.device=cpu", "--model.dropout=0.1", f"--data.source={corpus}",
                 f"--data.prepared_dir={prepared}", f"--deepspeed_config=zero{stage}", f"--output_dir={run_dir}",
                 *extra]:
        flags[flag.split("=")[0]] = flag
    return ["train", *flags.values()]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`forge-ds <argv>` in this process (no DeepSpeed start-up to pay again): (exit code, stdout, stderr)."""
    from forge_ds.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.output[-4000:]
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Runs:
    """Each run made at most once per module, on first use."""

    def __init__(self, base: Path, corpus: Path, prepared: Path):
        self.base, self.corpus, self.prepared = base, corpus, prepared
        self.made: dict[str, Run] = {}
        self.kill: dict = {}  # what the killed invocation left behind, recorded before anything resumes

    def args(self, run_dir: Path, stage: int, *extra: str) -> list[str]:
        return train_args(run_dir, self.corpus, self.prepared, stage, *extra)

    def _once(self, key: str, make) -> Run:
        if key not in self.made:
            self.made[key] = make(self.base / key)
        return self.made[key]

    def straight(self, stage: int) -> Run:
        return self._once(f"straight{stage}", lambda d: Run(d, [ok(forge(self.args(d, stage), 2, env=ENV))]))

    def split(self, stage: int) -> Run:
        def make(d: Path) -> Run:
            first = ok(forge(self.args(d, stage, f"--stop_after_steps={N}"), 2, env=ENV))
            if stage == 1:
                return Run(d, [first, *self._killed_then_resumed(d, stage)])
            extra = (["--training.checkpoint_every=1", "--training.keep_checkpoints=2", "--training.num_workers=2"]
                     if stage == 2 else [])
            return Run(d, [first, ok(forge(self.args(d, stage, "--resume", *extra), 2, env=ENV))])
        return self._once(f"split{stage}", make)

    def _killed_then_resumed(self, d: Path, stage: int) -> list[Result]:
        ranks = spawn_ranks(self.args(d, stage, "--resume"), 2, cwd=d.parent, timeout=240,
                            env={**ENV, "FORGE_DS_FAULT": f"save_after_shards@{2 * N}:kill:1"})
        root = d / "checkpoints"
        self.kill = {"codes": [r.returncode for r in ranks], "rank0": ranks[0].output,
                     "latest": (root / "latest").read_text().strip(),
                     "interrupted": sorted(p.name for p in files_in(root / f"step-{2 * N:08d}"))}
        self.kill["explicit"] = forge(self.args(d, stage, f"--resume=step-{2 * N:08d}"), 1, env=ENV)
        return [ok(forge(self.args(d, stage, "--resume"), 2, env=ENV))]

    def two_to_one(self, stage: int) -> Run:
        """straight[k]'s step-N checkpoint resumed on 1 rank; it checkpoints every step, for one_to_two."""
        def make(d: Path) -> Run:
            src = self.straight(stage).ckpt(N)
            shutil.copytree(src, d / "checkpoints" / src.name)
            args = self.args(d, stage, "--resume", "--training.gradient_accumulation_steps=2",
                             "--training.checkpoint_every=1")
            return Run(d, [ok(forge(args, 1, env=ENV))])
        return self._once(f"two_to_one{stage}", make)

    def one_to_two(self, stage: int) -> Run:
        """two_to_one's 1-rank checkpoint of step N+1 resumed on 2 ranks (a round trip 2 -> 1 -> 2)."""
        def make(d: Path) -> Run:
            src = self.two_to_one(stage).ckpt(N + 1)
            shutil.copytree(src, d / "checkpoints" / src.name)
            return Run(d, [ok(forge(self.args(d, stage, "--resume"), 2, env=ENV))])
        return self._once(f"one_to_two{stage}", make)

    def warm(self) -> Run:
        def make(d: Path) -> Run:
            # lr 1.0 without warm-up overshoots at once: validation is best after step 1, an older checkpoint than
            # the newest, which keep_checkpoints=1 must keep anyway.
            args = self.warm_args(d, f"--init_from={self.straight(2).export}")
            return Run(d, [ok(forge(args, 1, env=ENV))])
        return self._once("warm", make)

    def warm_args(self, d: Path, *extra: str) -> list[str]:
        return self.args(d, 0, "--model.dropout=0.0", "--training.max_steps=4", "--training.learning_rate=1.0",
                         "--training.warmup_steps=0", "--training.eval_every=1", "--training.checkpoint_every=1",
                         "--training.keep_checkpoints=1", "--training.export=best", *extra)


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_root, repetitive_corpus) -> Runs:
    return Runs(tmp_path_factory.mktemp("ckpt"), repetitive_corpus, prepared_root / "checkpoint-tiny")


STAGES = [pytest.param(k, id=f"zero{k}") for k in (0, 1, 2, 3)]
WORLD_CHANGES = [pytest.param(k, way, id=f"zero{k}-{way}") for k in (2, 3) for way in ("2to1", "1to2")]


# --- bit-exact resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_stop_and_resume_is_bit_exact(runs, stage):
    straight, split = runs.straight(stage), runs.split(stage)
    assert straight.dir != split.dir  # never a run compared with itself
    first, last = split.results[0], split.results[-1]
    assert f"stopped after {N} steps at step {N}/{2 * N}" in first.stdout
    assert f"step {N + 1}/" not in first.stdout
    assert f"from step {N} (resumed from step-{N:08d})" in last.stdout
    a, b = train_losses(straight.dir), train_losses(split.dir)
    assert sorted(a) == list(range(1, 2 * N + 1))
    assert a == b  # ==, not approx: every step's loss, including the dropout masks after the resume
    x, y = load(straight.export), load(split.export)
    assert list(x) == list(y) == contract_keys(2)
    diffs = {k: (x[k] - y[k]).abs().max().item() for k in x}
    assert all(d == 0.0 for d in diffs.values()), diffs


# --- another world size ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,way", WORLD_CHANGES)
def test_resume_at_another_world_size_continues_the_run(runs, stage, way):
    straight = runs.straight(stage)
    run = runs.two_to_one(stage) if way == "2to1" else runs.one_to_two(stage)
    (before, after), start = ((2, 1), N) if way == "2to1" else ((1, 2), N + 1)
    resumed = run.results[-1]
    assert f"world size {before} -> {after}: through DeepSpeed's universal checkpoint" in resumed.stdout
    assert f"from step {start} (resumed from step-{start:08d})" in resumed.stdout
    universal = run.ckpt(start).with_name(f"step-{start:08d}_universal")
    assert (universal / "COMPLETE").is_file() and (universal / "zero").is_dir()
    assert (run.dir / "checkpoints" / "latest_universal").read_text().strip() == universal.name
    ref, got = train_losses(straight.dir), train_losses(run.dir)
    assert sorted(got) == list(range(start + 1, 2 * N + 1))
    # The first resumed step (same samples, same dropout masks, same weights), and every later one: optimizer
    # moments, Adam's step count and per-group weight decay carried over too (DeepSpeed 0.19.8's ZeRO-3 universal
    # load loses the last two; forge_ds.universal.load repairs them).
    assert all(abs(got[s] - ref[s]) <= 1e-4 for s in got), (got, ref)
    assert got[2 * N] < got[start + 1]
    # the new checkpoints record the new world size, ready for the next resume
    assert json.loads((run.ckpt(2 * N) / "forge_state.json").read_text())["world_size"] == after


def test_convert_universal_command_and_zero0_needs_none(runs, tmp_path, capsys):
    src = runs.straight(2).ckpt(N)
    ckpt = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, ckpt)
    code, out_text, err = cli(["convert-universal", str(ckpt)], capsys)
    assert code == 0, err
    out = ckpt.with_name(ckpt.name + "_universal")
    assert f"-> {out}" in out_text
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "COMPLETE", "config.yaml", "ds_to_universal.log", "forge_state.json", "frozen_params.safetensors",
        "mp_rank_00_model_states.pt", "source_manifest.json"]
    assert (ckpt.parent / "latest_universal").read_text() == out.name
    # reused while the source is the same save; converted afresh once the tag was saved again
    (out / "marker").write_text("")
    assert cli(["convert-universal", str(ckpt)], capsys)[0] == 0 and (out / "marker").exists()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2))  # same files, another save's bytes
    assert cli(["convert-universal", str(ckpt)], capsys)[0] == 0 and not (out / "marker").exists()
    code, _, err = cli(["convert-universal", str(runs.straight(0).ckpt(N))], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(ERROR), err
    assert "ZeRO-0" in err and "no conversion needed" in err


# --- kill safety -----------------------------------------------------------------------------------------------

def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(runs):
    split = runs.split(1)  # its second invocation was killed in the middle of the step-2N save
    kill = runs.kill
    assert kill["codes"][1] == -signal.SIGKILL, kill
    assert kill["codes"][0] != 0, kill["rank0"][-2000:]  # rank 0 saw its peer die; it did not finish the save
    assert any(name.endswith("optim_states.pt") for name in kill["interrupted"]), kill["interrupted"]
    assert "COMPLETE" not in kill["interrupted"] and "forge_state.json" not in kill["interrupted"]
    assert kill["latest"] == f"step-{N:08d}"
    line = user_error_line(kill["explicit"])
    assert f"step-{2 * N:08d}" in line and "incomplete" in line and "--resume=auto" in line
    resumed = split.results[-1]
    assert f"from step {N} (resumed from step-{N:08d})" in resumed.stdout
    assert (split.ckpt(2 * N) / "COMPLETE").is_file() and split.export.is_file()


# --- keep-N, export=best ---------------------------------------------------------------------------------------

def test_keep_checkpoints_keeps_the_newest_and_the_one_resumed_from(runs):
    run = runs.split(2)  # resumed from N with checkpoint_every=1, keep_checkpoints=2: saves N+1 .. 2N
    resumed = run.results[-1]
    assert "resume: changed training.checkpoint_every: 3 -> 1" in resumed.stdout
    assert "resume: changed training.keep_checkpoints: 3 -> 2" in resumed.stdout
    kept = sorted(p.name for p in (run.dir / "checkpoints").glob("step-*"))
    assert kept == [f"step-{s:08d}" for s in (N, 2 * N - 1, 2 * N)], kept
    assert all((run.dir / "checkpoints" / name / "COMPLETE").is_file() for name in kept)


def test_export_best_exports_the_best_step_and_keeps_its_checkpoint(runs, capsys):
    run = runs.warm()
    vals = {m["step"]: m["val/loss"] for m in read_metrics(run.dir) if "val/loss" in m}
    best = min(vals, key=vals.get)
    assert best < 4, vals  # the point of this run: the best step is not the newest
    kept = sorted(p.name for p in (run.dir / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best:08d}", "step-00000004"], kept
    meta = json.loads((run.dir / "shared_components.json").read_text())
    assert meta["exported_step"] == best and meta["exported_weights"] == "best"
    offline = run.dir.parent / "best-offline"
    assert cli(["export", str(run.ckpt(best)), f"--out={offline}"], capsys)[0] == 0
    x, y = load(run.export), load(offline / "shared_components.pt")
    assert all(torch.equal(x[k], y[k]) for k in x)
    final = run.dir.parent / "final-offline"
    assert cli(["export", str(run.ckpt(4)), f"--out={final}"], capsys)[0] == 0
    assert not torch.equal(x["token_embedding.weight"], load(final / "shared_components.pt")["token_embedding.weight"])


# --- offline export --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [pytest.param(2, id="zero2"), pytest.param(3, id="zero3")])
def test_offline_export_equals_zero_to_fp32_on_the_shared_keys(runs, stage, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    straight = runs.straight(stage)
    ckpt = straight.ckpt(2 * N)
    code, _, err = cli(["export", str(ckpt), f"--out={tmp_path}"], capsys)  # one process, no distributed job
    assert code == 0, err
    got = load(tmp_path / "shared_components.pt")
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert list(got) == contract_keys(2)
    for key, tensor in got.items():
        if key == "pos_encoding.pe":
            assert torch.equal(tensor, sinusoidal_table(32, 32))
        else:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[f"shared.{key}"].float()), key
            assert not tensor.requires_grad, f"{key}: the offline export must match the live one, no grad flag"
    assert got["lm_head.weight"].data_ptr() == got["token_embedding.weight"].data_ptr()  # the tie, restored
    live = load(straight.export)  # what the run itself exported from the live engine at the same step
    assert all(torch.equal(got[k], live[k]) for k in live)
    meta = json.loads((tmp_path / "shared_components.json").read_text())
    assert meta["steps"] == 2 * N and meta["zero_stage"] == stage and set(meta["sha256"]) == {
        "shared_components.pt", "shared_components.safetensors"}



def test_streamed_safetensors_equals_save_file_byte_for_byte(tmp_path):
    """The export writes safetensors itself (save_file refuses the tie, an untied copy costs memory): same bytes."""
    from safetensors.torch import save_file

    from forge_ds.files import atomic_write, write_safetensors_streamed

    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.10.w": (3, 5), "blocks.2.w": (7,), "B": (), "a": (2, 0), "z": (4, 4)}  # order, scalar, empty
    state = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    state["tied"] = state["z"]  # as the LM head is the embedding: save_file gets an untied copy
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    atomic_write(tmp_path / "ours.safetensors", lambda tmp: write_safetensors_streamed(state, tmp, {"format": "pt"}))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "ref.safetensors"]  # no temp left

# --- checksums -------------------------------------------------------------------------------------------------

def test_a_damaged_export_is_a_one_line_error_for_verify_and_init_from(runs, tmp_path, capsys):
    src = runs.straight(2).dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("shared_components.pt", "shared_components.json"):
        shutil.copyfile(src / name, bad / name)
    data = (bad / "shared_components.pt").read_bytes()
    (bad / "shared_components.pt").write_bytes(data[: len(data) // 2])
    code, out, err = cli(["verify", str(bad / "shared_components.pt")], capsys)
    assert code == 1 and not err, err
    assert out.count("\n") == 1 and out.startswith("FAIL ") and "sha256" in out, out
    # altered, same length: only the checksum can tell
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (bad / "shared_components.pt").write_bytes(bytes(flipped))
    line = user_error_line(forge(runs.warm_args(tmp_path / "warm", f"--init_from={bad / 'shared_components.pt'}"), 1,
                                env=ENV))
    assert "shared_components.pt" in line and "sha256" in line


def test_a_truncated_shard_is_a_clear_error_on_resume_and_export(runs, tmp_path, capsys):
    src = runs.straight(2).ckpt(N)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / src.name
    shutil.copytree(src, ckpt)
    shard = sorted(ckpt.glob("*rank_1*optim_states.pt"))[-1]  # rank 1's optimizer partition
    shard.write_bytes(shard.read_bytes()[:1000])
    line = user_error_line(forge(runs.args(run, 2, "--resume"), 1, env=ENV))
    assert shard.name in line and "truncated" in line and "damaged" in line
    code, _, err = cli(["export", str(ckpt), f"--out={tmp_path / 'out'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and shard.name in err, err


# --- warm start ------------------------------------------------------------------------------------------------

def test_init_from_starts_fresh_from_the_exported_weights(runs):
    run = runs.warm()
    assert "from step 0" in run.results[0].stdout
    losses = train_losses(run.dir)
    assert sorted(losses) == [1, 2, 3, 4]  # a fresh schedule: step 1 onward, not the export's step 2N
    assert json.loads((run.ckpt(4) / "forge_state.json").read_text())["step"] == 4
    # The run's first forward = a model built from the config (fresh dummy experts from the seed) whose shared part
    # is the export, strictly loaded; dropout is 0 here, so it is one deterministic forward.
    model = SharedTrainingModel(300, 32, 4, 2, 64, 32, 0.0)
    initialize(model, "balanced", 42)
    fresh = first_batch_loss(model, runs.prepared)
    model.shared.load_state_dict(load(runs.straight(2).export), strict=True)
    warm = first_batch_loss(model, runs.prepared)
    assert abs(losses[1] - warm) <= 1e-5, (losses[1], warm)
    assert abs(losses[1] - fresh) > 0.1  # a run that ignored --init_from would be this far off


def first_batch_loss(model: SharedTrainingModel, prepared: Path) -> float:
    windows = data.TokenWindows(prepared / "train.bin", 32)
    sampler = data.GlobalBatchSampler(len(windows), 4, 1, 1, 42)  # TINY's batch, 1 rank, the default seed
    x, y = get_batch(windows, sampler.micro_indices(0, 0, 0), "cpu")
    with torch.no_grad():
        return float(model(x, y))


# --- incompatible resumes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,named", [("--model.d_model=64", "model.d_model: 32 -> 64"),
                                        ("other-corpus", "data.source")], ids=["d_model", "data_source"])
def test_resume_with_an_incompatible_config_names_the_difference(runs, tmp_path, flag, named):
    straight = runs.straight(2)
    if flag == "other-corpus":
        other = tmp_path / "other.txt"
        other.write_text("an entirely different text . " * 200, encoding="utf-8")
        flag = f"--data.source={other}"
    before = sorted(p.name for p in straight.dir.rglob("*"))
    line = user_error_line(forge(runs.args(straight.dir, 2, "--resume", flag), 1, env=ENV))
    assert named in line and "incompatible" in line
    assert sorted(p.name for p in straight.dir.rglob("*")) == before  # refused before touching the run


def test_changing_max_steps_on_resume_needs_allow_schedule_change(runs, tmp_path):
    run = tmp_path / "warm"
    shutil.copytree(runs.warm().dir, run)
    line = user_error_line(forge(runs.warm_args(run, "--resume", "--training.max_steps=6"), 1, env=ENV))
    assert "training.max_steps: 4 -> 6" in line and "--allow_schedule_change" in line
    r = ok(forge(runs.warm_args(run, "--resume", "--training.max_steps=6", "--allow_schedule_change"), 1, env=ENV))
    assert "resume: schedule changed training.max_steps: 4 -> 6 (--allow_schedule_change)" in r.stdout
    assert "from step 4 (resumed from step-00000004)" in r.stdout
    assert max(train_losses(run)) == 6
