"""Watching a run: TensorBoard scalars, console, metrics.jsonl / summary.json, `forge-ds evaluate` and `sample`.

Two real runs are shared by every test here: A, one rank at ZeRO-0 for 30 steps on the repetitive corpus (plain
log lines because stdout is a pipe), and B, two ranks at ZeRO-3 with --peak_tflops=1 for 2 steps. Event files are
read with TensorBoard's own EventAccumulator, and once through the real `tensorboard` server over HTTP.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, base_env, forge, free_port, read_metrics
from ranks import RankResult, Ranks
from forge_ds import data, prepare
from forge_ds import engine as engine_mod
from forge_ds.evaluate import get_batch
from forge_ds.config import load_saved
from forge_ds.metrics import Metrics, flops_per_token

STEPS_A, EVAL_EVERY_A, CLIP_A = 30, 10, 0.5
STEPS_B, EVAL_EVERY_B = 2, 1
LR, WARMUP, SEQ, BATCH = 3e-3, 2, 32, 4  # as in TINY
# One intra-op thread per process: on a shared 2-core machine torch's default pool spins against the other
# processes, and a tiny model's step takes 100x longer (same numbers either way).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

ALWAYS = ["train/loss", "train/ppl", "val/loss", "val/ppl", "opt/lr", "opt/grad_norm", "perf/tokens_per_s",
          "perf/tokens_per_s_per_rank", "perf/samples_per_s", "perf/step_time_s", "mem/cpu_rss_gb", "progress/epoch"]
PER_STEP = [t for t in ALWAYS if not t.startswith("val/")]
GPU_ONLY = ["mem/gpu_max_allocated_gb", "mem/gpu_reserved_gb"]
FP16_ONLY = ["fp16/loss_scale", "fp16/skipped_steps"]
SUMMARY_FIELDS = ["wall_time_s", "steps_this_run", "tokens_this_run", "mean_tokens_per_s", "mfu", "peak_cpu_rss_gb",
                  "peak_gpu_allocated_gb", "final_train_loss", "final_train_ppl", "final_val_loss", "final_val_ppl",
                  "best_val_loss", "best_step", "steps", "tokens_seen", "export", "checkpoints", "tensorboard",
                  "metrics"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """ONE_THREAD for this test process too (the in-process model work here), restored for other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Run:
    dir: Path
    prepared: Path
    stdout: str          # rank 0
    stderr: str
    rank1_stdout: str = ""
    rank1_stderr: str = ""

    def events(self) -> EventAccumulator:
        ea = EventAccumulator(str(self.dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        return ea


def scalars(ea: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


def train_args(run_dir: Path, prepared: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"--output_dir={run_dir}", f"--data.source={corpus}", f"--data.prepared_dir={prepared}",
            "--training.checkpoint_every=100", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_root, repetitive_corpus) -> dict[str, Run]:
    """Both runs at once: most of a tiny run is process start-up, which overlaps well."""
    prepared = prepared_root / "monitoring"
    root_a, root_b = tmp_path_factory.mktemp("monitor-a"), tmp_path_factory.mktemp("monitor-b")
    # Prepared first, by one process: two runs tokenising into the same folder at once would race.
    prepare.prepare(str(repetitive_corpus), vocab_size=300, prepared_dir=str(prepared), show_progress=False)
    ranks_b = Ranks(train_args(root_b / "run", prepared, repetitive_corpus, "--deepspeed_config=zero3",
                               f"--training.max_steps={STEPS_B}", f"--training.eval_every={EVAL_EVERY_B}",
                               "--peak_tflops=1"), 2, root_b, ONE_THREAD)
    try:
        a = forge(train_args(root_a / "run", prepared, repetitive_corpus, "--deepspeed_config=zero0",
                             f"--training.max_steps={STEPS_A}", f"--training.eval_every={EVAL_EVERY_A}",
                             f"--training.max_grad_norm={CLIP_A}"), ranks=1, cwd=root_a, env=ONE_THREAD)
    finally:
        b0, b1 = ranks_b.wait()
    assert a.returncode == 0, a.output[-3000:]
    assert b0.returncode == 0 and b1.returncode == 0, (b0.output + b1.output)[-3000:]
    return {"a": Run(root_a / "run", prepared, a.stdout, a.stderr),
            "b": Run(root_b / "run", prepared, b0.stdout, b0.stderr, b1.stdout, b1.stderr)}


@pytest.fixture(scope="module")
def run_a(runs) -> Run:
    return runs["a"]


@pytest.fixture(scope="module")
def run_b(runs) -> Run:
    return runs["b"]


def tiny_param_counts() -> tuple[int, int]:
    from forge_ds.model import SharedTrainingModel

    model = SharedTrainingModel(300, 32, 4, 2, 64, SEQ, 0.1)
    return model.shared_parameter_count(), model.temp_parameter_count()


def reference_step1_grad_norm(run: Run, world: int) -> float:
    """The global gradient norm of step 1, before clipping, recomputed in plain torch: same init, same global
    batch, same dropout masks; the mean over ranks' losses is what DeepSpeed's all-reduce averages."""
    cfg = load_saved(run.dir / "config.yaml")
    model = engine_mod.build_model(cfg, None)
    model.train()
    windows = data.TokenWindows(run.prepared / "train.bin", SEQ)
    sampler = data.GlobalBatchSampler(len(windows), BATCH, 1, world, cfg.training.seed)
    for rank in range(world):
        torch.manual_seed(engine_mod.dropout_seed(cfg.training.seed, 0, rank))  # slot = rank at micro 0
        x, y = get_batch(windows, sampler.micro_indices(0, rank, 0), "cpu")
        (model(x, y) / world).backward()
    return engine_mod.grad_norm_of(model)


# ----------------------------------------------------------------------------------------------- TensorBoard


def test_every_always_present_tag_has_one_point_per_step_or_eval(run_a):
    ea = run_a.events()
    assert set(ALWAYS) <= set(ea.Tags()["scalars"])
    for tag in PER_STEP:
        assert sorted(scalars(ea, tag)) == list(range(1, STEPS_A + 1)), tag
    evals = list(range(EVAL_EVERY_A, STEPS_A + 1, EVAL_EVERY_A))  # the final evaluation lands on the last step
    for tag in ("val/loss", "val/ppl"):
        assert sorted(scalars(ea, tag)) == evals, tag


def test_conditional_tags_appear_exactly_when_their_condition_holds(run_a, run_b):
    tags_a, tags_b = set(run_a.events().Tags()["scalars"]), set(run_b.events().Tags()["scalars"])
    # CPU, fp32: no GPU memory, no loss scale; MFU only where a peak is known (--peak_tflops in run B).
    assert not (tags_a | tags_b) & set(GPU_ONLY + FP16_ONLY)
    assert "perf/mfu" not in tags_a
    assert "perf/mfu" in tags_b and set(ALWAYS) <= tags_b


def test_mfu_is_tokens_per_second_times_flops_per_token_over_ranks_times_peak(run_b):
    shared, temp = tiny_param_counts()
    per_token = flops_per_token(shared + temp, 2, 32, SEQ)
    assert per_token == 6 * (shared + temp) + 12 * 2 * 32 * SEQ and shared > 0 and temp > 0
    rows = [m for m in read_metrics(run_b.dir) if "perf/mfu" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS_B + 1))
    for m in rows:
        assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s"] * per_token / (2 * 1e12), rel=1e-9)
        assert m["perf/tokens_per_s_per_rank"] == pytest.approx(m["perf/tokens_per_s"] / 2, rel=1e-12)
        assert m["perf/tokens_per_s"] == pytest.approx(2 * BATCH * SEQ / m["perf/step_time_s"], rel=1e-9)
    assert json.loads((run_b.dir / "summary.json").read_text())["mfu"] > 0


def test_loss_is_finite_and_falls_over_the_run(run_a):
    ea = run_a.events()
    loss, val = scalars(ea, "train/loss"), scalars(ea, "val/loss")
    assert all(math.isfinite(v) for v in [*loss.values(), *val.values()])
    first, last = [loss[s] for s in range(1, 6)], [loss[s] for s in range(STEPS_A - 4, STEPS_A + 1)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, loss
    assert val[STEPS_A] < val[EVAL_EVERY_A]
    for step, v in loss.items():
        assert scalars(ea, "train/ppl")[step] == pytest.approx(math.exp(v), rel=1e-5)


def test_lr_follows_warmup_then_cosine_at_known_steps(run_a):
    """opt/lr at step s is the rate step s applied: lr * lr_lambda(s - 1) (warm-up from 0, cosine to 0)."""
    schedule = engine_mod.lr_lambda(STEPS_A, WARMUP)
    logged = scalars(run_a.events(), "opt/lr")
    assert logged[1] == 0.0 and logged[WARMUP + 1] == pytest.approx(LR, rel=1e-6)
    for step in (1, 2, 3, 4, 16, 29, 30):
        assert logged[step] == pytest.approx(LR * schedule(step - 1), rel=1e-6, abs=1e-12), step
    assert [m["opt/lr"] for m in read_metrics(run_a.dir) if "opt/lr" in m] == \
        pytest.approx([LR * schedule(s) for s in range(STEPS_A)], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("which,world", [("a", 1), ("b", 2)])
def test_grad_norm_is_the_global_norm_before_clipping(which, world, request):
    """ZeRO-0 in fp32 (where DeepSpeed keeps no norm) and ZeRO-3 on two ranks: step 1's logged norm equals the
    plain-torch norm of the rank-averaged gradients, which exceeds the clipping threshold."""
    run = request.getfixturevalue(f"run_{which}")
    norms = {m["step"]: m["opt/grad_norm"] for m in read_metrics(run.dir) if "train/loss" in m}
    steps = STEPS_A if which == "a" else STEPS_B
    assert sorted(norms) == list(range(1, steps + 1)) and all(math.isfinite(v) and v > 0 for v in norms.values())
    expected = reference_step1_grad_norm(run, world)
    clip = load_saved(run.dir / "config.yaml").training.max_grad_norm
    assert expected > clip  # else "before clipping" would be untested
    assert norms[1] == pytest.approx(expected, rel=1e-4)


def test_config_text_and_hparams_are_in_the_event_file(run_a):
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = run_a.events()
    text = {tag: ea.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in ea.PluginTagToContent("text")}
    assert "d_model: 32" in text["config/text_summary"] and "max_steps: 30" in text["config/text_summary"]
    assert json.loads(text["ds_config/text_summary"].strip("`\n"))["zero_optimization"]["stage"] == 0
    hp = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.d_model"].number_value == 32 and "zero_stage" in start.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hparam/val_loss"]
    final_val = json.loads((run_a.dir / "summary.json").read_text())["final_val_loss"]
    assert scalars(ea, "hparam/val_loss") == {STEPS_A: pytest.approx(final_val, rel=1e-6)}


def test_one_event_file_writer_and_no_deepspeed_monitor(run_a, run_b):
    for run in (run_a, run_b):
        tb = run.dir / "tensorboard"
        assert [p.name for p in tb.iterdir()] == [next(tb.glob("events.out.tfevents.*")).name]
        # cwd is the run's parent: a DeepSpeed monitor would have written its own event files somewhere below it
        assert len(list(run.dir.parent.rglob("events.out.tfevents.*"))) == 1


def test_tensorboard_server_serves_the_scalars_over_http(run_a, tmp_path):
    expected = [(e.step, e.value) for e in run_a.events().Scalars("train/loss")]
    port, log = free_port(), tmp_path / "tensorboard.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(["tensorboard", "--logdir", str(run_a.dir / "tensorboard"), "--port", str(port),
                                   "--host", "127.0.0.1"], stdout=log_file, stderr=subprocess.STDOUT,
                                  env=base_env(), cwd=tmp_path)
    base, runs, points, deadline = f"http://127.0.0.1:{port}", None, None, time.time() + 60
    try:
        while time.time() < deadline and server.poll() is None:
            try:
                runs = json.load(urllib.request.urlopen(f"{base}/data/runs", timeout=5))
                if runs:
                    url = f"{base}/data/plugin/scalars/scalars?run={runs[0]}&tag=train/loss"
                    points = json.load(urllib.request.urlopen(url, timeout=5))
                    if len(points) == len(expected):
                        break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass  # still starting, or still reading the event file
            time.sleep(0.3)
        assert server.poll() is None and points is not None, log.read_text()[-2000:]
        assert runs == ["."]
        assert [(step, value) for _, step, value in points] == \
            [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ----------------------------------------------------------------------------------------------- console and files


def test_start_block_counts_parameters_at_every_zero_stage(run_a, run_b):
    shared, temp = tiny_param_counts()
    for run, stage, world in ((run_a, 0, 1), (run_b, 3, 2)):
        assert f"parameters: shared {shared:,} (kept) + temporary experts {temp:,} (discarded)" in run.stdout
        assert f"ZeRO-{stage}, fp32, cpu, world size {world}" in run.stdout
        assert f"global {BATCH * world} = {BATCH} per rank" in run.stdout and "tokens/epoch" in run.stdout
        assert f"tensorboard --logdir {run.dir / 'tensorboard'}" in run.stdout
        assert f"checkpoints {run.dir / 'checkpoints'}" in run.stdout


def test_plain_log_lines_when_stdout_is_not_a_terminal_and_only_on_rank_0(run_a, run_b):
    lines = re.findall(r"^step (\d+)/(\d+) loss [\d.]+ lr \S+ tok/s [\d,]+ eta", run_a.stdout, re.M)
    assert lines == [(str(s), str(STEPS_A)) for s in range(1, STEPS_A + 1)]  # log_every=1
    assert "\r" not in run_a.stdout and "it/s" not in run_a.stdout  # no progress bar in a log file
    assert re.findall(r"^eval step (\d+): val loss", run_a.stdout, re.M) == ["10", "20", "30"]
    assert "run summary:" in run_a.stdout
    assert len(re.findall(rf"^step \d+/{STEPS_B} ", run_b.stdout, re.M)) == STEPS_B
    assert "step " not in run_b.rank1_stdout and "[INFO]" not in run_b.rank1_stdout + run_b.rank1_stderr
    # whatever rank 1 prints at all is a warning or error that names its rank
    for line in filter(str.strip, run_b.rank1_stdout.splitlines() + run_b.rank1_stderr.splitlines()):
        assert line.startswith("[rank 1]") or line.startswith(" "), line


def test_progress_bar_on_a_terminal_replaces_the_plain_lines(tmp_path, capsys):
    m = Metrics(tmp_path, tmp_path / "tb", enabled=True, total_steps=3, start_step=0, log_every=1,
                tokens_per_step=128, samples_per_step=4, flops_per_tok=1.0, peak=None, world_size=1, device="cpu",
                fp16=False, terminal=True)
    try:
        for step in (1, 2):
            m.train_step(step, 2.5, 1e-3, 0.7, 0.1, step / 10)
        m.evaluation(2, 2.25)
    finally:
        m.close()
    out, err = capsys.readouterr()
    assert "step 1/3" not in out + err
    assert "2/3" in err and "loss=2.500" in err and "tok_s=1,280" in err
    assert "eval step 2: val loss 2.2500" in out + err


def test_metrics_jsonl_and_summary_json_have_the_documented_fields(run_a):
    rows = read_metrics(run_a.dir)
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]
    assert len(rows) == len(train_rows) + len(val_rows) + 0
    assert all(set(r) == {"step", *PER_STEP} for r in train_rows)
    assert all(set(r) == {"step", "val/loss", "val/ppl"} for r in val_rows)
    summary = json.loads((run_a.dir / "summary.json").read_text())
    assert list(summary) == SUMMARY_FIELDS
    assert summary["steps"] == summary["steps_this_run"] == STEPS_A
    assert summary["tokens_this_run"] == summary["tokens_seen"] == STEPS_A * BATCH * SEQ
    assert summary["final_val_loss"] == val_rows[-1]["val/loss"] and summary["final_train_loss"] == \
        train_rows[-1]["train/loss"]
    assert summary["final_train_ppl"] == pytest.approx(math.exp(summary["final_train_loss"]))
    assert summary["mfu"] is None and summary["peak_gpu_allocated_gb"] is None and summary["peak_cpu_rss_gb"] > 0
    assert summary["mean_tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    for key in ("export", "checkpoints", "tensorboard", "metrics"):
        assert Path(summary[key]).exists(), key


# ----------------------------------------------------------------------------------------------- evaluate / sample


@pytest.fixture(scope="module")
def commands(run_a, run_b) -> dict[str, list[RankResult]]:
    """The CLI calls on the finished runs, started together (each is mostly interpreter start-up)."""
    started = {
        "evaluate_a": Ranks(["evaluate", str(run_a.dir)], 1, run_a.dir.parent, ONE_THREAD),
        "evaluate_b": Ranks(["evaluate", str(run_b.dir / "checkpoints" / f"step-{STEPS_B:08d}")], 2,
                            run_b.dir.parent, ONE_THREAD),
        "sample_a": Ranks(["sample", str(run_a.dir), "--prompt=the cat", "--max_new_tokens=20", "--seed=7"],
                          1, run_a.dir.parent, ONE_THREAD),
    }
    return {name: ranks.wait() for name, ranks in started.items()}


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_evaluate_reproduces_the_final_val_loss_and_prints_the_unigram_line(run_a, commands):
    [r] = commands["evaluate_a"]
    assert r.returncode == 0, r.output[-2000:]
    result = _last_json(r.stdout)
    summary = json.loads((run_a.dir / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert (result["split"], result["step"], result["zero_stage"], result["ranks"]) == ("val", STEPS_A, 0, 1)
    unigram = data.unigram_entropy(run_a.prepared / "val.bin")
    assert result["unigram_entropy"] == pytest.approx(unigram, rel=1e-12)
    assert re.search(rf"^unigram +entropy {unigram:.4f} nats", r.stdout, re.M)
    assert re.search(rf"^loss +{result['loss']:.4f} +perplexity", r.stdout, re.M)


def test_evaluate_a_zero3_checkpoint_on_two_ranks(run_b, commands):
    r0, r1 = commands["evaluate_b"]
    assert r0.returncode == 0 and r1.returncode == 0, (r0.output + r1.output)[-2000:]
    result = _last_json(r0.stdout)
    final_val = json.loads((run_b.dir / "summary.json").read_text())["final_val_loss"]
    assert result["loss"] == pytest.approx(final_val, abs=1e-4)
    assert (result["zero_stage"], result["ranks"]) == (3, 2)
    assert r1.stdout.strip() == ""


def test_evaluate_other_text_with_the_runs_tokenizer(run_a, tmp_path):
    """Another source is evaluated whole (split "all"), tokenised with the run's tokenizer."""
    from forge_ds.evaluate import evaluate_checkpoint

    text = tmp_path / "other.txt"
    text.write_text("the cat sat on the mat . a dog ran in the park\n\nwe ate bread with jam . " * 8)
    result = evaluate_checkpoint(str(run_a.dir), data_overrides={"source": str(text)}, show=False)
    tok = prepare.load_tokenizer(str(run_a.dir / "tokenizer.json"), 300)
    tok.encode_special_tokens = True
    n_tokens = sum(len(tok.encode(d).ids) for d in prepare.load_documents(str(text)))
    assert (result["split"], result["tokens"]) == ("all", n_tokens)
    assert math.isfinite(result["loss"]) and result["unigram_entropy"] > 0


def test_sample_prints_text_and_is_deterministic_for_a_seed(run_a, commands):
    from forge_ds.evaluate import find_checkpoint, load_full_model, load_run_tokenizer
    from forge_ds.sample import generate

    [r] = commands["sample_a"]
    assert r.returncode == 0, r.output[-2000:]
    assert r.stdout.endswith("\n")
    cli_text = r.stdout[:-1]
    assert cli_text.startswith("the cat") and len(cli_text) > len("the cat") and "<bos>" not in cli_text
    assert "(seed 7)" in r.stderr
    ckpt = find_checkpoint(str(run_a.dir))
    model, cfg, state = load_full_model(ckpt)
    tok, _ = load_run_tokenizer(ckpt, cfg, state)
    same = [generate(model, tok, "the cat", 20, 0.8, 50, seed=7) for _ in range(2)]
    assert same == [cli_text, cli_text]  # same seed: same text, in this process and in the CLI's
    others = {generate(model, tok, "the cat", 20, 1.0, 0, seed=s) for s in (8, 9, 10)}
    assert len(others) > 1  # the seed does steer the sampling
    # a prompt longer than max_seq_len is cropped to the last window instead of failing
    long_prompt = "the cat sat on the mat . " * 12
    assert generate(model, tok, long_prompt, 5, 0.0, 0, seed=0).startswith(long_prompt.rstrip())


def test_evaluate_and_sample_user_mistakes_are_one_line_errors(run_a, tmp_path, capsys, monkeypatch):
    from forge_ds import cli

    # in-process: launch_env.detect() fills RANK/WORLD_SIZE/MASTER_* in; they must not leak into later tests
    monkeypatch.setattr(os, "environ", dict(os.environ))

    cases = [(["evaluate", str(tmp_path / "missing")], "no such run or checkpoint folder"),
             (["evaluate", str(run_a.dir), "--model.d_model=8"], "unknown option --model.d_model"),
             (["evaluate", str(run_a.dir), "--split=test"], "--split='test' is not one of"),
             (["sample", str(run_a.dir), "--temperature=-1"], "--temperature=-1 must be"),
             (["sample", str(run_a.dir / "tensorboard")], "neither a run folder")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("forge-ds: error: ") and message in err, (argv, err)
        assert "\n" not in err
