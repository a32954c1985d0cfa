"""The typed config: precedence, presets, ModularForge's own YAML, validation, `--help`, saved round-trips."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, base_env
from forge_ds import config as config_mod
from forge_ds.config import DataConfig, ModelConfig, TrainingConfig, resolve
from forge_ds.errors import ForgeError

FIXTURES = ROOT / "tests" / "fixtures"
MODULARFORGE_YAML = FIXTURES / "modularforge-default.yaml"

# The contract's model section (ModularForge's configs/default.yaml).
CONTRACT_MODEL = dict(d_model=512, n_heads=8, n_layers=4, d_ff=2048, vocab_size=16384, max_seq_len=512, dropout=0.1)
CONTRACT_TRAINING = dict(learning_rate=3e-4, batch_size=16, epochs_shared=3, warmup_steps=200, weight_decay=0.01,
                         max_grad_norm=1.0, gradient_accumulation_steps=1, seed=42, checkpoint_every=1000,
                         log_every=50, eval_every=500)


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


def error_of(config=None, overrides=None) -> str:
    with pytest.raises(ForgeError) as info:
        resolve(config, overrides)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# --- precedence -------------------------------------------------------------------------------------------------

def test_defaults_are_the_contract():
    cfg, notes = resolve()
    assert cfg.model.model_dump() == CONTRACT_MODEL
    assert {k: getattr(cfg.training, k) for k in CONTRACT_TRAINING} == CONTRACT_TRAINING
    assert cfg.data.source == "builtin:pydoc" and cfg.training.precision == "auto"
    assert notes == []


def test_precedence_defaults_then_file_then_cli(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"d_model": 64, "n_heads": 4},
                                            "training": {"max_steps": 7, "seed": 3}})
    cfg, _ = resolve(path, {"model.d_model": 96, "data.source": "corpus.txt"})
    assert cfg.model.d_model == 96                    # CLI beats file
    assert cfg.model.n_heads == 4                     # file beats default
    assert cfg.training.max_steps == 7 and cfg.training.seed == 3
    assert cfg.data.source == "corpus.txt"            # CLI beats default
    assert cfg.model.n_layers == ModelConfig().n_layers  # untouched default
    assert cfg.training.learning_rate == TrainingConfig().learning_rate


def test_json_config_file_is_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"training": {"keep_checkpoints": 5}}), encoding="utf-8")
    assert resolve(str(path))[0].training.keep_checkpoints == 5


def test_cli_override_that_breaks_a_file_value_is_checked_after_merge(tmp_path):
    # The file's n_heads=4 is fine with its own d_model but not with the CLI's: validation runs on the merge.
    path = write_yaml(tmp_path / "c.yaml", {"model": {"d_model": 64, "n_heads": 4}})
    assert "not divisible" in error_of(path, {"model.d_model": 66})


# --- presets ----------------------------------------------------------------------------------------------------

def test_modularforge_preset_equals_dataclass_defaults():
    cfg, notes = resolve("modularforge")
    assert cfg.model == ModelConfig() and cfg.training == TrainingConfig() and cfg.data == DataConfig()
    assert cfg.model.model_dump() == CONTRACT_MODEL
    assert notes == []


def test_cpu_demo_preset_loads_a_small_fp32_model():
    cfg, notes = resolve("cpu_demo")
    assert notes == []
    assert cfg.model.d_model < ModelConfig().d_model and cfg.model.vocab_size < ModelConfig().vocab_size
    assert cfg.training.precision == "fp32"
    assert cfg.data.source == "builtin:pydoc"  # runs with no network and no files


def test_unknown_preset_lists_the_presets():
    message = error_of("no_such_preset")
    assert "no_such_preset" in message and "cpu_demo" in message and "modularforge" in message


# --- ModularForge's own YAML ------------------------------------------------------------------------------------

def test_modularforge_yaml_gives_contract_model_hf_source_fp32_and_one_note():
    cfg, notes = resolve(str(MODULARFORGE_YAML))
    assert cfg.model.model_dump() == CONTRACT_MODEL
    assert {k: getattr(cfg.training, k) for k in CONTRACT_TRAINING} == CONTRACT_TRAINING
    assert cfg.data.source == "hf:wikitext:wikitext-103-raw-v1"
    assert cfg.training.precision == "fp32"  # use_amp: false
    # Phase-1 keys it carries are honoured.
    assert cfg.training.num_workers == 4 and cfg.training.device == "auto"
    assert cfg.data.min_article_length == 100 and cfg.data.max_articles is None
    assert len(notes) == 1
    listed = set(re.split(r",\s*", notes[0].split("ignored Phase-2/3 keys:")[1].strip()))
    assert listed == {"model.n_experts", "model.top_k", "model.expert_dropout", "training.epochs_expert",
                      "data.partition_strategy", "data.overlap_ratio", "data.data_dir", "assembly", "evaluation"}


def test_modularforge_yaml_use_amp_true_means_auto_and_no_dataset_config(tmp_path):
    doc = yaml.safe_load(MODULARFORGE_YAML.read_text())
    doc["training"]["use_amp"] = True
    del doc["data"]["dataset_config"]
    cfg, _ = resolve(write_yaml(tmp_path / "mf.yaml", doc))
    assert cfg.training.precision == "auto"
    assert cfg.data.source == "hf:wikitext"


def test_modularforge_yaml_cli_still_wins():
    cfg, _ = resolve(str(MODULARFORGE_YAML), {"training.precision": "bf16", "data.source": "builtin:pydoc"})
    assert cfg.training.precision == "bf16" and cfg.data.source == "builtin:pydoc"


def test_tokenizer_vocab_size_must_equal_vocab_size(tmp_path):
    doc = yaml.safe_load(MODULARFORGE_YAML.read_text())
    doc["data"]["tokenizer_vocab_size"] = 8000
    message = error_of(write_yaml(tmp_path / "mf.yaml", doc))
    assert "tokenizer_vocab_size=8000" in message and "vocab_size=16384" in message


def test_mps_device_is_an_error(tmp_path):
    doc = yaml.safe_load(MODULARFORGE_YAML.read_text())
    doc["training"]["device"] = "mps"
    assert "mps" in error_of(write_yaml(tmp_path / "mf.yaml", doc))
    assert "device" in error_of(None, {"training.device": "mps"})


def test_unknown_key_in_a_modularforge_section_is_an_error(tmp_path):
    doc = yaml.safe_load(MODULARFORGE_YAML.read_text())
    doc["training"]["lerning_rate"] = 1e-3
    assert "training.lerning_rate" in error_of(write_yaml(tmp_path / "mf.yaml", doc))


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section,key", [("model", "d_modle"), ("training", "epochs"), ("data", "dataset")])
def test_unknown_key_in_a_file_names_it(tmp_path, section, key):
    message = error_of(write_yaml(tmp_path / "c.yaml", {section: {key: 1}}))
    assert f"{section}.{key}" in message and "c.yaml" in message


def test_unknown_cli_key_names_it():
    assert "model.widht" in error_of(None, {"model.widht": 3})


def test_wrong_type_names_the_key(tmp_path):
    message = error_of(None, {"model.d_model": "abc"})
    assert "model.d_model" in message and "'abc'" in message
    message = error_of(write_yaml(tmp_path / "c.yaml", {"training": {"batch_size": "many"}}))
    assert "training.batch_size" in message


def test_d_model_not_divisible_by_n_heads():
    message = error_of(None, {"model.d_model": 100, "model.n_heads": 8})
    assert "d_model=100" in message and "n_heads=8" in message


def test_negative_num_workers_is_an_error():
    assert "training.num_workers=-1" in error_of(None, {"training.num_workers": -1})


# The table of bounds, each declared on its field: (values refused, values at the bound accepted, words).
AT_LEAST_ONE = ["model.d_model", "model.n_heads", "model.n_layers", "model.d_ff", "model.max_seq_len",
                "training.batch_size", "training.gradient_accumulation_steps", "training.epochs_shared",
                "training.eval_every", "training.log_every", "training.checkpoint_every", "training.keep_checkpoints"]
BOUNDS = {
    "training.learning_rate": (["nan", "inf", float("nan"), 0, -1e-4], [1e-12], "a finite number > 0"),
    "training.weight_decay": (["nan", "-inf", -0.01], [0], "a finite number >= 0"),
    "training.max_grad_norm": (["nan", "inf", -1.0], [0], "a finite number >= 0"),
    "model.dropout": ([1.0, -0.1, "nan"], [0, 0.999], "a number in [0, 1)"),
    "data.val_fraction": ([0, 1, 1.5, "nan"], [0.001, 0.999], "a number in (0, 1)"),
    **{k: ([-1], [0], "an integer >= 0") for k in (
        "training.warmup_steps", "training.max_skipped_steps", "data.min_article_length", "training.num_workers",
        "training.seed", "data.split_seed")},
    **{k: ([0, -3], [1], "an integer >= 1") for k in AT_LEAST_ONE},
    **{k: ([0, -1], [1, None], "an integer >= 1 or None") for k in (
        "data.max_articles", "training.eval_max_batches", "training.max_steps")},
}


@pytest.mark.parametrize("key", list(BOUNDS))
def test_every_bound_is_one_line_naming_field_value_and_bound(key):
    bad, good, words = BOUNDS[key]
    for value in bad:
        message = error_of(None, {key: value})
        assert message == f"command line: {key}={value} is invalid (must be {words})", message
    for value in good:
        extra = {"model.n_heads": 1} if key == "model.d_model" else {}  # 1 head divides any d_model
        cfg, _ = resolve(None, {key: value, **extra})
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value


def test_zero_heads_is_a_bound_not_a_division_by_zero(tmp_path):
    assert "model.n_heads=0 is invalid (must be an integer >= 1)" in error_of(None, {"model.n_heads": 0})
    path = write_yaml(tmp_path / "c.yaml", {"model": {"n_heads": 0}})
    assert error_of(path) == f"{path}: model.n_heads=0 is invalid (must be an integer >= 1)"


def test_unknown_section_is_an_error(tmp_path):
    message = error_of(write_yaml(tmp_path / "c.yaml", {"optimizer": {"lr": 1}}))
    assert "optimizer" in message
    assert "foo.bar" in error_of(None, {"foo.bar": 1})


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n", encoding="utf-8")
    assert "bad.yaml" in error_of(str(path))


# --- --help, saved config, modularforge.yaml --------------------------------------------------------------------

def test_train_help_lists_every_field_with_its_default():
    p = subprocess.run([sys.executable, "-m", "forge_ds.cli", "train", "--help"], cwd=ROOT, env=base_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for section, model in (("model", ModelConfig), ("training", TrainingConfig), ("data", DataConfig)):
        for name, field in model.model_fields.items():
            line = next((l for l in lines if l.strip().startswith(f"--{section}.{name} ")), None)
            assert line is not None, f"--{section}.{name} missing from --help"
            assert f"default {field.default!r}" in line, line
    for option in ("--config", "--deepspeed_config", "--output_dir", "--resume", "--overwrite",
                   "--stop_after_steps", "--init_from", "--allow_schedule_change", "--tensorboard_dir",
                   "--peak_tflops", "--local_rank"):
        assert any(l.strip().startswith(option) for l in lines), option
    assert any("--training.keep_checkpoints" in l and "default 3" in l for l in lines)
    assert any("--data.source" in l and "'builtin:pydoc'" in l for l in lines)


def test_saved_config_round_trips(tmp_path):
    cfg, _ = resolve("cpu_demo", {"training.max_steps": 11, "data.tokenizer": "/x/tokenizer.json",
                                  "training.export": "best"})
    path = tmp_path / "config.yaml"
    path.write_text(config_mod.to_yaml(cfg), encoding="utf-8")
    assert config_mod.load_saved(path) == cfg
    # A saved config is also a valid --config (how a user reruns a run's settings).
    assert resolve(str(path))[0] == cfg


def test_load_saved_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {bogus: 1}\n", encoding="utf-8")
    with pytest.raises(ForgeError):
        config_mod.load_saved(path)


@pytest.mark.parametrize("source,precision", [("hf:wikitext:wikitext-103-raw-v1", "fp32"),
                                              ("builtin:pydoc", "bf16")])
def test_modularforge_yaml_output_reads_back_with_the_same_model(tmp_path, source, precision):
    cfg, _ = resolve("cpu_demo", {"data.source": source, "training.precision": precision,
                                  "training.seed": 7, "training.learning_rate": 5e-4})
    path = tmp_path / "modularforge.yaml"
    path.write_text(config_mod.modularforge_yaml(cfg), encoding="utf-8")
    back, _ = resolve(str(path))
    assert back.model == cfg.model
    for key in ("learning_rate", "batch_size", "epochs_shared", "warmup_steps", "weight_decay", "max_grad_norm",
                "gradient_accumulation_steps", "seed", "device"):
        assert getattr(back.training, key) == getattr(cfg.training, key), key
    assert back.training.precision == ("fp32" if precision == "fp32" else "auto")
    # ModularForge reads data.tokenizer_vocab_size; it must be the model's vocabulary.
    assert yaml.safe_load(path.read_text())["data"]["tokenizer_vocab_size"] == cfg.model.vocab_size
    if source.startswith("hf:"):
        assert back.data.source == source


def test_train_help_spells_out_allowed_values_not_python_types():
    from forge_ds import cli, usage

    text = usage.command_help("train", cli.COMMANDS, cli.TYPED_FLAGS)
    assert "Literal" not in text and "Optional" not in text and "typing" not in text
    line = next(l for l in text.splitlines() if l.strip().startswith("--training.precision "))
    assert "auto|fp32|bf16|fp16" in line
    assert "int ≥ 1, or unset" in next(l for l in text.splitlines() if l.strip().startswith("--stop_after_steps "))
    columns = {l.index("default ") for l in text.splitlines() if l.startswith("  --training.")}
    assert len(columns) == 1  # aligned


@pytest.mark.parametrize("command", ["check", "plan", "export", "verify", "evaluate", "sample",
                                     "convert-universal", "slurm-template"])
def test_each_command_help_describes_that_command(command):
    from forge_ds import cli, usage

    text = usage.command_help(command, cli.COMMANDS, cli.TYPED_FLAGS)
    assert text.startswith(f"usage: forge-ds {command} ")
    assert (cli.COMMANDS[command].__doc__ or "").split()[0] in text
    if command == "plan":  # its own flags described from its docstring, then train's config fields
        assert "nodes in the job" in next(l for l in text.splitlines() if l.strip().startswith("--nodes "))
        assert "Flags:" not in text and "--model.d_model" in text


def test_prepare_help_is_prepares_own_and_goes_to_stdout():
    p = subprocess.run([sys.executable, "-m", "forge_ds.cli", "prepare", "--help"], cwd=ROOT, env=base_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("usage: forge-ds prepare ") and "forge-ds train" not in p.stdout.splitlines()[0]
    assert "--data.source" in p.stdout
