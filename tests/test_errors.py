"""Bad input: one line `forge-ds: error: …` on stderr, exit code 2, before any heavy work, nothing overwritten.

Every case of the robustness issue is a row of CASES. Each row runs as `forge-ds train` and as `forge-ds check`
with the same flags (check must find exactly what train finds, with the same message) aimed at a finished run
with --overwrite: even told to replace it, a run that fails validation leaves the old run as it was.
The rows run in processes forked from a warm interpreter (tests/warm_cli.py), so 60 processes cost seconds;
the cases that concern processes themselves (2 ranks, the `deepspeed` launcher, the one real run every row
leans on) are cold `python -m forge_ds.cli` / `deepspeed` processes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import ERROR, ROOT, TINY, Result, base_env, forge, free_port, user_error_line
from ranks import spawn_ranks
from warm_cli import WarmCli

from forge_ds.files import sha256_file

STEPS, EVERY = 4, 2


def error_line(r: Result) -> str:
    """The one error line of a user error, which must also be the last thing the process printed."""
    line = user_error_line(r)
    assert r.stderr.strip().splitlines()[-1] == line, r.stderr[-3000:]
    return line


def snapshot(*dirs: Path) -> dict:
    # run.lock aside: it names the last process that took the directory, and a refused `train` takes it first
    # (forge_ds/runlock.py), so that nothing else is written while it checks.
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*"))
            if p.name != "run.lock"}


def byte_level_tokenizer(path: Path, texts: list[str]) -> None:
    """A valid contract tokenizer (byte-level BPE, specials 0..3), trained on other text than the run's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2),
                                                                                                 ("<eos>", 3)])
    tok.save(str(path))


@dataclass
class Work:
    cwd: Path          # where the finished run ran, without --output_dir: runs/<time> and data/prepared/<key>
    inputs: Path       # every input file, outside cwd
    corpus: str        # as given on the command line: relative to cwd
    run: Path
    prepared: Path
    result: Result
    listing: list[str]
    inputs_listing: list[str]
    env: dict

    @property
    def export(self) -> Path:
        return self.run / "shared_components.pt"

    def args(self, extra: list[str]) -> list[str]:
        args = [*TINY, f"--data.source={self.corpus}", f"--data.prepared_dir={self.prepared}", *map(str, extra)]
        if not any(a.startswith("--output_dir") for a in args):
            args += [f"--output_dir={self.run}", "--overwrite"]
        return args


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return base_env({"HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf-cache"))})


@pytest.fixture(scope="module")
def cli(env):
    server = WarmCli(env)
    yield server
    server.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory, env, cli) -> Work:
    """One real finished run (1 process, bf16 at ZeRO-0 on CPU, a corpus with one non-UTF-8 byte) and the input
    files of every case. (`cli` first: its server warms up during the run.)"""
    base = tmp_path_factory.mktemp("errors")
    cwd, inputs = base / "cwd", base / "inputs"
    cwd.mkdir()
    inputs.mkdir()
    sentences = ["the cat sat on the mat", "a dog ran in the park", "my bird sang a song",
                 "the sun rose over the hill", "we ate bread with jam"]
    paragraphs = [" . ".join(sentences[(i + j) % 5] for j in range(5)) for i in range(200)]
    (inputs / "corpus.txt").write_bytes("\n\n".join(paragraphs).encode() + b"\n\ncaf\xe9 au lait . the end\n")
    result = forge(["train", *TINY, "--data.source=../inputs/corpus.txt", f"--training.max_steps={STEPS}",
                    f"--training.eval_every={EVERY}", f"--training.checkpoint_every={EVERY}",
                    "--deepspeed_config=zero0", "--training.precision=bf16"], cwd=cwd, env=env)
    assert result.returncode == 0, result.output[-4000:]
    listing, inputs_listing = sorted(os.listdir(cwd)), sorted(os.listdir(inputs))
    (run,) = (cwd / "runs").iterdir()
    (prepared,) = (cwd / "data" / "prepared").iterdir()

    (inputs / "bad.json").write_text('{"model": {"d_model": 32,}}\n')
    (inputs / "bad.yaml").write_text("model:\n  d_model: 32\n   n_heads: [4\n")
    (inputs / "unknown.yaml").write_text("model:\n  d_modle: 32\n")
    mf = yaml.safe_load((ROOT / "tests" / "fixtures" / "modularforge-default.yaml").read_text())
    mf["training"]["device"] = "mps"
    (inputs / "mf_mps.yaml").write_text(yaml.safe_dump(mf))
    mf["training"]["device"] = "auto"
    mf["model"]["rope_theta"] = 10000
    (inputs / "mf_unknown.yaml").write_text(yaml.safe_dump(mf))
    (inputs / "stage4.json").write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    (inputs / "contra.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                                    "zero_optimization": {"stage": 2}}))
    (inputs / "empty.txt").write_bytes(b"")
    (inputs / "short.txt").write_text("hello world\n\nbye now\n")
    (inputs / "nofield.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n{"body": "g h"}\n')

    from tokenizers import Tokenizer, models

    wrong = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3, "a": 4}, unk_token="<unk>"))
    wrong.save(str(inputs / "swapped_specials.json"))
    byte_level_tokenizer(inputs / "other_tokenizer.json", ["some entirely different text about ships"] * 50)
    swapped = inputs / "prepared-swapped"
    shutil.copytree(prepared, swapped)
    shutil.copyfile(inputs / "other_tokenizer.json", swapped / "tokenizer.json")

    for name in ("truncated", "truncated_alone"):  # the second without the JSON (and its sha256) beside it
        (inputs / name).mkdir()
        shutil.copyfile(run / "shared_components.pt", inputs / name / "shared_components.pt")
        with open(inputs / name / "shared_components.pt", "r+b") as f:
            f.truncate((run / "shared_components.pt").stat().st_size // 2)
    shutil.copyfile(run / "shared_components.json", inputs / "truncated" / "shared_components.json")

    (inputs / "empty").mkdir()
    for ext in ("pt", "safetensors"):
        (inputs / "empty" / f"shared_components.{ext}").write_bytes(b"")
    # The run's export as if made with another tokenizer: its JSON names that tokenizer's sha256, which sits beside it.
    (inputs / "othertok").mkdir()
    shutil.copyfile(run / "shared_components.pt", inputs / "othertok" / "shared_components.pt")
    shutil.copyfile(inputs / "other_tokenizer.json", inputs / "othertok" / "tokenizer.json")
    meta = json.loads((run / "shared_components.json").read_text())
    meta["tokenizer_sha256"] = sha256_file(inputs / "other_tokenizer.json")
    (inputs / "othertok" / "shared_components.json").write_text(json.dumps(meta))
    (inputs / "notckpt").mkdir()
    (inputs / "notckpt" / "notes.txt").write_text("not a checkpoint")

    # A run directory holding an unfinished run: step 2 complete, step 4 interrupted, step 6 an empty folder.
    broken = inputs / "unfinished"
    shutil.copytree(run / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "step-00000004" / "COMPLETE").unlink()
    (broken / "checkpoints" / "step-00000006").mkdir()
    return Work(cwd, inputs, "../inputs/corpus.txt", run, prepared, result, listing, inputs_listing, env)


def learned_vocab(work: Work) -> int:
    return json.loads((work.prepared / "meta.json").read_text())["vocab_learned"]


# name: (extra flags, given the Work; fragments the error line must contain)
CASES = {
    "malformed_json_config": (lambda w: [f"--config={w.inputs / 'bad.json'}"], ["bad.json:1:", "malformed JSON"]),
    "malformed_yaml_config": (lambda w: [f"--config={w.inputs / 'bad.yaml'}"], ["bad.yaml:3:", "malformed YAML"]),
    "unknown_key_in_config_file": (lambda w: [f"--config={w.inputs / 'unknown.yaml'}"],
                                   ["unknown.yaml", "unknown config key 'model.d_modle'"]),
    "unknown_key_on_command_line": (lambda w: ["--model.d_modle=32"],
                                    ["command line", "unknown config key 'model.d_modle'"]),
    "unknown_section_on_command_line": (lambda w: ["--trainig.max_steps=3"], ["unknown option --trainig.max_steps"]),
    "wrong_type": (lambda w: ["--model.d_model=abc"], ["model.d_model='abc'", "integer"]),
    "d_model_not_divisible_by_n_heads": (lambda w: ["--model.d_model=30"], ["d_model=30", "n_heads=4"]),
    "zero_heads": (lambda w: ["--model.n_heads=0"],  # a ZeroDivisionError once: the bound runs before d_model % n_heads
                   ["command line: model.n_heads=0 is invalid (must be an integer >= 1)"]),
    "nan_learning_rate": (lambda w: ["--training.learning_rate=nan"],
                          ["training.learning_rate=nan is invalid (must be a finite number > 0)"]),
    "nan_weight_decay": (lambda w: ["--training.weight_decay=nan"], ["training.weight_decay=nan", ">= 0"]),
    "nan_max_grad_norm": (lambda w: ["--training.max_grad_norm=nan"], ["training.max_grad_norm=nan", ">= 0"]),
    "infinite_max_grad_norm": (lambda w: ["--training.max_grad_norm=1e999"], ["training.max_grad_norm=inf"]),
    "dropout_of_one": (lambda w: ["--model.dropout=1.0"], ["model.dropout=1.0", "must be a number in [0, 1)"]),
    "negative_warmup": (lambda w: ["--training.warmup_steps=-1"], ["training.warmup_steps=-1", "integer >= 0"]),
    "zero_eval_max_batches": (lambda w: ["--training.eval_max_batches=0"],
                              ["training.eval_max_batches=0", "integer >= 1 or None"]),
    "val_fraction_of_one": (lambda w: ["--data.val_fraction=1"], ["data.val_fraction=1", "(0, 1)"]),
    "vocab_size_leaves_no_room_for_specials": (lambda w: ["--model.vocab_size=4"], ["vocab_size=4", "special"]),
    "vocab_size_below_the_byte_alphabet": (lambda w: ["--model.vocab_size=100"], ["vocab_size=100", "260"]),
    "vocab_size_smaller_than_the_tokenizer": (
        lambda w: [f"--data.tokenizer={w.run / 'tokenizer.json'}", f"--model.vocab_size={learned_vocab(w) - 1}",
                   f"--data.prepared_dir={w.inputs / 'prep-bigtok'}"],
        lambda w: [f"has {learned_vocab(w)} tokens", f"vocab_size={learned_vocab(w) - 1}"]),
    "tokenizer_with_another_specials_layout": (
        lambda w: [f"--data.tokenizer={w.inputs / 'swapped_specials.json'}",
                   f"--data.prepared_dir={w.inputs / 'prep-swapped'}"],
        ["swapped_specials.json", "<pad>=0 <unk>=1"]),
    "prepared_data_made_with_another_tokenizer": (
        lambda w: [f"--data.tokenizer={w.inputs / 'other_tokenizer.json'}"],
        ["was made from different data or settings", "tokenizer_sha256"]),
    "prepared_tokenizer_replaced": (
        lambda w: [f"--data.prepared_dir={w.inputs / 'prepared-swapped'}"],
        ["prepared-swapped/tokenizer.json", "differs from the tokenizer the token files were made with"]),
    "max_seq_len_the_corpus_cannot_fill": (lambda w: ["--model.max_seq_len=20000"],
                                           ["corpus.txt", "max_seq_len+1=20001"]),
    "zero_stage_outside_0_3": (lambda w: [f"--deepspeed_config={w.inputs / 'stage4.json'}"],
                               ["stage4.json", "zero_optimization.stage=4", "0, 1, 2 or 3"]),
    "fp16_on_cpu": (lambda w: ["--training.precision=fp16"], ["fp16 is not supported on CPU", "bf16 or fp32"]),
    "ds_config_contradicts_training_config": (
        lambda w: [f"--deepspeed_config={w.inputs / 'contra.json'}"],
        ["contra.json", "train_micro_batch_size_per_gpu=8", "training.batch_size=4"]),
    "ds_config_file_missing": (lambda w: [f"--deepspeed_config={w.inputs / 'missing.json'}"],
                               ["missing.json", "zero0, zero0_autocast, zero1, zero2"]),
    "corpus_path_missing": (lambda w: [f"--data.source={w.inputs / 'nope.txt'}"], ["nope.txt", "does not exist"]),
    "empty_corpus": (lambda w: [f"--data.source={w.inputs / 'empty.txt'}",
                                f"--data.prepared_dir={w.inputs / 'prep-empty'}"], ["empty.txt", "is empty"]),
    "corpus_shorter_than_one_window": (lambda w: [f"--data.source={w.inputs / 'short.txt'}",
                                                  f"--data.prepared_dir={w.inputs / 'prep-short'}"],
                                       ["short.txt", "fewer than one window", "max_seq_len+1=33"]),
    "jsonl_line_without_text_field": (lambda w: [f"--data.source={w.inputs / 'nofield.jsonl'}",
                                                 f"--data.prepared_dir={w.inputs / 'prep-jsonl'}"],
                                      ["line 3", "nofield.jsonl", "'text'"]),
    "modularforge_yaml_device_mps": (lambda w: [f"--config={w.inputs / 'mf_mps.yaml'}"], ["mf_mps.yaml", "'mps'"]),
    "modularforge_yaml_unknown_key": (lambda w: [f"--config={w.inputs / 'mf_unknown.yaml'}"],
                                      ["mf_unknown.yaml", "unknown config key 'model.rope_theta'"]),
    "init_from_export_with_other_max_seq_len": (
        lambda w: [f"--init_from={w.export}", "--model.max_seq_len=16", f"--data.prepared_dir={w.inputs / 'p16'}"],
        ["--init_from=", "max_seq_len 32", "16"]),
    "init_from_truncated_export": (lambda w: [f"--init_from={w.inputs / 'truncated' / 'shared_components.pt'}"],
                                   ["truncated/shared_components.pt", "sha256 differs"]),
    "init_from_truncated_export_without_its_json": (
        lambda w: [f"--init_from={w.inputs / 'truncated_alone' / 'shared_components.pt'}"],
        ["truncated_alone/shared_components.pt", "cannot load", "truncated"]),
    "init_from_empty_file": (lambda w: [f"--init_from={w.inputs / 'empty' / 'shared_components.pt'}"],
                             ["empty/shared_components.pt: the file is empty (0 bytes)"]),
    "init_from_export_of_another_tokenizer": (
        lambda w: [f"--init_from={w.inputs / 'othertok' / 'shared_components.pt'}"],
        lambda w: ["othertok/shared_components.pt: the export was trained with another tokenizer",
                   f"sha256 {sha256_file(w.inputs / 'other_tokenizer.json')[:12]}…",
                   f"this run's {sha256_file(w.run / 'tokenizer.json')[:12]}…",
                   f"--data.tokenizer={w.inputs / 'othertok' / 'tokenizer.json'}"]),
    "init_from_with_resume": (lambda w: [f"--init_from={w.export}", "--resume"], ["cannot be combined"]),
    "resume_from_an_incomplete_checkpoint": (
        lambda w: [f"--output_dir={w.inputs / 'unfinished'}", "--resume=step-00000004"],
        ["step-00000004", "incomplete", "--resume=auto"]),
    "resume_from_an_empty_checkpoint_folder": (
        lambda w: [f"--output_dir={w.inputs / 'unfinished'}", "--resume=step-00000006"],
        ["step-00000006", "empty or missing"]),
    "resume_from_a_missing_checkpoint": (
        lambda w: [f"--output_dir={w.inputs / 'unfinished'}", "--resume=step-00000099"],
        ["step-00000099", "no checkpoint folder", "step-00000002"]),
    "resume_from_a_folder_that_is_not_a_checkpoint": (
        lambda w: [f"--output_dir={w.inputs / 'unfinished'}", f"--resume={w.inputs / 'notckpt'}"],
        ["notckpt: not a checkpoint folder", "checkpoints/step-"]),
    "output_dir_holding_an_unfinished_run": (lambda w: [f"--output_dir={w.inputs / 'unfinished'}"],
                                             ["unfinished", "unfinished run", "--resume"]),
    "output_dir_holding_a_finished_run": (lambda w: [f"--output_dir={w.run}"],
                                          ["already holds a finished run", "--overwrite", "--resume"]),
    # Paths the run will write: a file, under a file, or a place that takes no writes (tests run as root, so
    # /proc rather than permission bits).
    "output_dir_is_a_file": (lambda w: [f"--output_dir={w.inputs / 'short.txt'}"],
                             ["--output_dir=", "short.txt is an existing file"]),
    "output_dir_under_a_file": (lambda w: [f"--output_dir={w.inputs / 'short.txt' / 'run'}"],
                                ["--output_dir=", "lies under", "short.txt, which is a file"]),
    "output_dir_where_nothing_can_be_written": (lambda w: ["--output_dir=/proc/forge-ds-run"],
                                                ["--output_dir=/proc/forge-ds-run", "nothing can be written"]),
    "tensorboard_dir_is_a_file": (lambda w: [f"--tensorboard_dir={w.inputs / 'short.txt'}"],
                                  ["--tensorboard_dir=", "is an existing file"]),
    "prepared_dir_under_a_file": (lambda w: [f"--data.prepared_dir={w.inputs / 'short.txt' / 'prep'}"],
                                  ["--data.prepared_dir=", "which is a file"]),
    "resume_with_overwrite": (lambda w: ["--resume"], ["--resume continues a run", "--overwrite replaces it"]),
    "hf_source_without_a_name": (lambda w: ["--data.source=hf:"], ["'hf:' names no dataset", "hf:<name>"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_heavy_work_and_check_says_the_same(case, work, cli):
    extra, fragments = CASES[case]
    args = work.args(extra(work))
    fragments = fragments(work) if callable(fragments) else fragments
    before = snapshot(work.run, work.prepared, work.inputs / "unfinished")
    trained = cli.run(["train", *args], cwd=work.cwd)
    line = error_line(trained)
    for fragment in fragments:
        assert fragment in line, line
    assert "forge-ds train:" not in trained.stdout  # the start block: the engine never came up
    assert trained.wall_s < 10, f"{trained.wall_s:.1f} s: the error came after heavy work"
    checked = cli.run(["check", *args], cwd=work.cwd)
    assert error_line(checked) == line
    assert snapshot(work.run, work.prepared, work.inputs / "unfinished") == before
    if case == "init_from_export_with_other_max_seq_len":
        assert not (work.inputs / "p16").exists()  # an export that does not fit fails before any data work


def test_check_passes_on_good_flags_fresh_and_resuming(work, cli):
    fresh = cli.run(["check", *work.args(["--deepspeed_config=zero1", "--training.precision=bf16",
                                          f"--output_dir={work.inputs / 'new-run'}"])], cwd=work.cwd)
    assert fresh.returncode == 0, fresh.output[-3000:]
    assert "check passed: device cpu, precision bf16, ZeRO-1, world size 1" in fresh.stdout
    assert not (work.inputs / "new-run").exists()  # check trains nothing and creates no run directory
    # The finished run's own flags (its data in the default prepared folder under cwd), resumed.
    same = [*TINY, f"--data.source={work.corpus}", "--deepspeed_config=zero0", "--training.precision=bf16",
            f"--training.max_steps={STEPS}", f"--training.eval_every={EVERY}", f"--training.checkpoint_every={EVERY}",
            f"--output_dir={work.run}", "--resume"]
    resuming = cli.run(["check", *same, "--world_size=1"], cwd=work.cwd)
    assert resuming.returncode == 0, resuming.output[-3000:]
    assert f"resuming from step-{STEPS:08d}" in resuming.stdout
    # and a resume that would change the model is found by check too, with train's message
    changed = [*same, "--model.d_ff=128"]
    line = error_line(cli.run(["check", *changed], cwd=work.cwd))
    assert "model.d_ff: 64 -> 128" in line
    assert error_line(cli.run(["train", *changed], cwd=work.cwd)) == line


def test_resume_into_a_missing_or_empty_output_dir_starts_fresh_and_says_so(work, cli):
    """What a SLURM job's first submission relies on: --resume with nothing to resume is a fresh run."""
    for target in (work.inputs / "first-submission", work.inputs / "empty-run"):
        if target.name == "empty-run":
            target.mkdir()
        r = cli.run(["check", *work.args([f"--output_dir={target}", "--resume"])], cwd=work.cwd)
        assert r.returncode == 0, r.output[-3000:]
        assert f"resume: no complete checkpoint in {target} yet; starting a fresh run" in r.stdout
    missing = cli.run(["check", *work.args([f"--output_dir={work.inputs / 'empty-run'}", "--resume=step-00000002"])],
                      cwd=work.cwd)
    assert "no checkpoint folder" in error_line(missing)  # an explicit tag must exist


def test_resume_after_the_corpus_changed_blames_the_data_not_the_tokenizer(work, cli, tmp_path):
    """Same flags, same data.source path, other text behind it: the checkpoint's tokenizer cannot match."""
    cwd, inputs = tmp_path / "cwd", tmp_path / "inputs"
    cwd.mkdir()
    inputs.mkdir()
    text = (work.inputs / "corpus.txt").read_bytes()
    (inputs / "corpus.txt").write_bytes(text.replace(b"cat", b"owl").replace(b"dog", b"elk"))
    shutil.copytree(work.run / "checkpoints", tmp_path / "run" / "checkpoints")
    same = [*TINY, "--data.source=../inputs/corpus.txt", "--deepspeed_config=zero0", "--training.precision=bf16",
            f"--training.max_steps={STEPS}", f"--training.eval_every={EVERY}", f"--training.checkpoint_every={EVERY}",
            f"--output_dir={tmp_path / 'run'}", f"--data.prepared_dir={tmp_path / 'prepared'}", "--resume"]
    line = error_line(cli.run(["check", *same], cwd=cwd))
    assert "the corpus behind data.source=../inputs/corpus.txt" in line and "changed since" in line
    assert "another tokenizer" not in line
    assert error_line(cli.run(["train", *same], cwd=cwd)) == line


def test_export_out_that_cannot_be_written_is_one_line(work, cli):
    for out, fragment in ((work.inputs / "short.txt", "is an existing file"), ("/proc/forge-export", "nothing can")):
        r = cli.run(["export", str(work.run), f"--out={out}"], cwd=work.cwd)
        assert fragment in error_line(r)


def test_bf16_at_zero0_on_cpu_trains_resumes_and_exports_a_valid_file(work, cli):
    summary = json.loads((work.run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert "ZeRO-0, bf16, cpu" in work.result.stdout
    verified = cli.run(["verify", str(work.export)], cwd=work.cwd)
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.output[-2000:]


def test_verify_passes_both_formats_we_write_and_fails_an_empty_file_in_one_line(work, cli):
    for ext in ("pt", "safetensors"):  # safetensors stores keys sorted: only the .pt keeps the contract's order
        ours = cli.run(["verify", str(work.run / f"shared_components.{ext}")], cwd=work.cwd)
        assert ours.returncode == 0 and ours.stdout.startswith("OK"), ours.output[-2000:]
        empty = work.inputs / "empty" / f"shared_components.{ext}"
        failed = cli.run(["verify", str(empty)], cwd=work.cwd)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.output[-2000:]
        assert failed.stdout == f"FAIL {empty}: the file is empty (0 bytes); truncated, or not a forge_ds export\n"


def test_export_and_convert_say_what_a_folder_is_when_it_is_not_a_checkpoint(work, cli):
    newest = work.run / "checkpoints" / f"step-{STEPS:08d}"
    line = error_line(cli.run(["convert-universal", str(work.run)], cwd=work.cwd))
    assert line == (f"{ERROR} {work.run}: a run directory, not a checkpoint folder; "
                    f"its newest complete checkpoint is {newest}")
    for command in ("export", "convert-universal"):
        line = error_line(cli.run([command, str(work.inputs / "notckpt")], cwd=work.cwd))
        assert "notckpt: not a checkpoint folder" in line and "--resume" not in line and "incomplete" not in line


def test_checkpoint_and_export_files_share_one_mode(work):
    """frozen_params.safetensors was 0600 (safetensors' save_file), every other file 0644."""
    files = [p for p in (work.run / "checkpoints").rglob("*") if p.is_file()] + list(work.run.glob("shared_*"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert "frozen_params.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~current_umask())}, modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_non_utf8_bytes_are_replaced_with_a_warning_counted_in_meta(work, cli):
    meta = json.loads((work.prepared / "meta.json").read_text())
    assert meta["non_utf8_documents"] == 1
    warning = "forge-ds: warning: 1 document(s) of ../inputs/corpus.txt held bytes that are not UTF-8"
    assert warning in work.result.stderr  # printed by train (rank 0 prepares)
    prepared = cli.run(["prepare", *TINY, f"--data.source={work.corpus}"], cwd=work.cwd)
    assert prepared.returncode == 0, prepared.output[-2000:]
    assert warning in prepared.stderr and str(work.prepared.name) in prepared.stdout  # reused, still warned


def test_a_run_writes_only_its_run_and_prepared_directories(work):
    assert work.listing == ["data", "runs"]
    assert work.inputs_listing == ["corpus.txt"]  # nothing written beside the corpus either


def test_start_block_reports_every_input_path_resolved(work):
    line = next(l for l in work.result.stdout.splitlines() if l.startswith("  inputs"))
    assert f"corpus {(work.inputs / 'corpus.txt').resolve()}" in line
    assert f"prepared {work.prepared.resolve()}" in line
    assert f"deepspeed config {(ROOT / 'ds_configs' / 'zero0.json').resolve()}" in line
    assert f"forge-ds train: {work.run.resolve()}" in work.result.stdout


class Payload:
    """Unpickling this calls os.makedirs(path): code that a weights_only load must never run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_an_export_holding_a_pickled_object_is_refused_without_running_it(work, cli, tmp_path):
    # The real export with its pickle swapped for one holding the payload (zip surgery: no torch needed here).
    marker, evil = tmp_path / "pwned", tmp_path / "shared_components.pt"
    with zipfile.ZipFile(work.export) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"token_embedding.weight": Payload(marker)}, protocol=2)
                pickle.loads(data)  # the control: an unsafe unpickle runs it
                assert marker.is_dir()
                marker.rmdir()
            zout.writestr(item, data)
    verified = cli.run(["verify", str(evil)], cwd=work.cwd)
    assert verified.returncode == 1 and "FAIL" in verified.stdout and "UnpicklingError" in verified.stdout
    started = cli.run(["train", *work.args([f"--init_from={evil}"])], cwd=work.cwd)
    assert "cannot load (UnpicklingError" in error_line(started)
    assert not marker.exists()


def test_user_error_under_two_ranks_is_printed_once_by_rank_0(work, tmp_path):
    """The corpus is checked on rank 0 (which prepares the data) and the verdict broadcast: both ranks exit 2,
    only rank 0 says why."""
    results = spawn_ranks(["train", *work.args([f"--data.source={work.inputs / 'nope.txt'}",
                                                f"--output_dir={tmp_path / 'run'}"])], 2, work.cwd, work.env)
    assert [r.returncode for r in results] == [2, 2], results[0].output[-3000:] + results[1].output[-3000:]
    line = results[0].stderr.strip().splitlines()[-1]
    assert line.startswith(ERROR) and "nope.txt" in line and "Traceback" not in results[0].stderr
    assert ERROR not in results[1].stderr and "Traceback" not in results[1].stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env,speaker", [
    ({"RANK": "0", "LOCAL_RANK": "0"}, ""),
    ({"RANK": "1", "LOCAL_RANK": "1"}, None),  # rank 0's node: rank 0 has said it
    ({"RANK": "4", "LOCAL_RANK": "0"}, "rank 4 on {host}: "),  # another node: what only it sees must show
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "8", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"}, "rank 8 on {host}: "),
])
def test_a_user_error_is_said_by_rank_0_and_by_the_first_rank_of_every_other_node(monkeypatch, capsys, env, speaker):
    from forge_ds.cli import main

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model.d_modle=64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    if speaker is None:
        assert err == ""
    else:
        assert err.startswith(f"{ERROR} {speaker.format(host=socket.gethostname())}") and "d_modle" in err, err


def test_deepspeed_launcher_passes_on_exit_code_2_with_one_error_line(work):
    """`deepspeed` kills the other ranks when one exits non-zero and exits with that rank's code (docs/ERRORS.md)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train_shared.py",
           *work.args([f"--deepspeed_config={work.inputs / 'contra.json'}"])]
    p = subprocess.run(cmd, cwd=ROOT, env=work.env, capture_output=True, text=True, timeout=300)
    assert "contra.json" in user_error_line(p), p.stderr[-3000:]
