"""The one typed config: model / training / data, resolved once as defaults < file < CLI.

The dataclass defaults are ModularForge's `configs/default.yaml` values (the contract), so a bare run trains
ModularForge's model. A config file may be ours (sections model/training/data), a preset name from
`forge_ds/presets/`, or ModularForge's own YAML: its Phase-1 keys are translated, its Phase-2/3 keys ignored
with one note, anything else unknown is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from forge_ds.errors import ForgeError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class _Section(BaseModel):
    # extra="forbid": a typo in a key must fail loudly, not train the wrong model for an hour.
    # validate_assignment: CLI overrides go through the same type checks as file values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 4
    d_ff: int = 2048
    vocab_size: int = 16384
    max_seq_len: int = 512
    dropout: float = 0.1


class TrainingConfig(_Section):
    learning_rate: float = 3e-4
    batch_size: int = 16  # per data-parallel rank, as in ModularForge
    epochs_shared: int = 3
    max_steps: Optional[int] = None  # when set, overrides epochs_shared; either one defines the LR schedule
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_every: int = 500
    eval_max_batches: Optional[int] = None  # None: the whole validation split
    keep_checkpoints: int = 3
    export: Literal["final", "best"] = "final"
    recipe: Literal["balanced", "modularforge"] = "balanced"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0  # worker processes preparing batches ahead of the step (tokenizing: data.num_proc)
    compile: bool = False
    activation_checkpointing: bool = False
    max_skipped_steps: int = 20  # fp16 overflow steps in a row before we call it divergence


class DataConfig(_Section):
    source: str = "builtin:pydoc"
    text_field: str = "text"
    val_fraction: float = 0.1
    split_seed: int = 0
    tokenizer: Optional[str] = None
    prepared_dir: Optional[str] = None
    min_article_length: int = 0
    max_articles: Optional[int] = None
    tokenizer_train_bytes: int = 1 << 30  # the BPE sample bound; 1 GiB covers WikiText-103 whole
    num_proc: Optional[int] = None  # encoding processes; None: the cores this process may use, at run time


class Config(_Section):
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        m, t, d = self.model, self.training, self.data
        if m.d_model % m.n_heads:
            raise ValueError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                             "choose n_heads that divides d_model")
        positive = {"model.d_model": m.d_model, "model.n_heads": m.n_heads, "model.n_layers": m.n_layers,
                    "model.d_ff": m.d_ff, "model.max_seq_len": m.max_seq_len, "training.batch_size": t.batch_size,
                    "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
                    "training.epochs_shared": t.epochs_shared, "training.log_every": t.log_every,
                    "training.eval_every": t.eval_every, "training.checkpoint_every": t.checkpoint_every,
                    "training.keep_checkpoints": t.keep_checkpoints}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if m.vocab_size <= 4:
            raise ValueError(f"model.vocab_size={m.vocab_size} leaves no room beside the 4 special tokens "
                             "(<pad> <unk> <bos> <eos>); use at least 260 for byte-level BPE")
        if m.vocab_size < 260 and d.tokenizer is None:  # checked here, not after data loading, to fail in seconds
            raise ValueError(f"model.vocab_size={m.vocab_size} is too small for the byte-level BPE forge_ds trains "
                             "(256 byte symbols + 4 special tokens); use at least 260, or give --data.tokenizer")
        if d.tokenizer_train_bytes < 1 or (d.num_proc is not None and d.num_proc < 1):
            raise ValueError(f"data.tokenizer_train_bytes={d.tokenizer_train_bytes} and data.num_proc={d.num_proc} "
                             "must be at least 1 (omit num_proc for every core)")
        if t.max_steps is not None and t.max_steps < 1:
            raise ValueError(f"training.max_steps={t.max_steps} must be at least 1")
        if t.num_workers < 0:
            raise ValueError(f"training.num_workers={t.num_workers} must be 0 (the training process loads batches "
                             "itself) or more")
        if not 0.0 <= m.dropout < 1.0:
            raise ValueError(f"model.dropout={m.dropout} must be in [0, 1)")
        if not 0.0 < d.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
        if t.learning_rate <= 0:
            raise ValueError(f"training.learning_rate={t.learning_rate} must be positive")
        return self


# ModularForge YAML keys that only concern Phase 2/3 or its partitioning: ignored, with one note listing them.
_MODULARFORGE_IGNORED = {
    "model": {"n_experts", "top_k", "expert_dropout"},
    "training": {"epochs_expert", "use_amp"},  # use_amp is translated below, then dropped
    "data": {"partition_strategy", "overlap_ratio", "data_dir", "dataset_name", "dataset_config",
             "tokenizer_vocab_size"},
}
_MODULARFORGE_IGNORED_SECTIONS = {"assembly", "evaluation"}


def _translate_modularforge(raw: dict, where: str) -> tuple[dict, list[str]]:
    """Map ModularForge's Phase-1 keys onto ours; return (our dict, ignored key names)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    ignored = sorted(s for s in raw if s in _MODULARFORGE_IGNORED_SECTIONS)
    for section in ignored:
        raw.pop(section)
    model, training, data = (raw.setdefault(s, {}) for s in ("model", "training", "data"))
    for s in ("model", "training", "data"):
        if not isinstance(raw[s], dict):
            raise ForgeError(f"{where}: section '{s}' must be a mapping, got {type(raw[s]).__name__}")
    if "dataset_name" in data:
        name, conf = data["dataset_name"], data.get("dataset_config")
        data["source"] = f"hf:{name}" + (f":{conf}" if conf else "")
    if "use_amp" in training:
        if not isinstance(training["use_amp"], bool):
            raise ForgeError(f"{where}: training.use_amp must be true or false, got {training['use_amp']!r}")
        training["precision"] = "auto" if training["use_amp"] else "fp32"
    if training.get("device") == "mps":
        raise ForgeError(f"{where}: training.device 'mps' cannot run DeepSpeed; use auto, cpu or cuda")
    if "tokenizer_vocab_size" in data:
        vocab = model.get("vocab_size", ModelConfig().vocab_size)
        if data["tokenizer_vocab_size"] != vocab:
            raise ForgeError(f"{where}: data.tokenizer_vocab_size={data['tokenizer_vocab_size']} differs from "
                             f"model.vocab_size={vocab}; forge_ds uses one vocabulary size, make them equal")
    for section, keys in _MODULARFORGE_IGNORED.items():
        for key in sorted(keys & raw[section].keys()):
            raw[section].pop(key)
            if key not in ("use_amp", "dataset_name", "dataset_config", "tokenizer_vocab_size"):
                ignored.append(f"{section}.{key}")
    return raw, ignored


def find_config_file(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ForgeError(f"config '{name_or_path}' is neither a file nor a preset; presets: {presets}")


def read_config_file(name_or_path: str) -> tuple[dict, list[str], Path]:
    """Parse a YAML/JSON config file or preset; returns (sections dict, ignored ModularForge keys, path)."""
    path = find_config_file(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ForgeError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ForgeError(f"{path}{at}: malformed YAML ({getattr(e, 'problem', e)}); fix the file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ForgeError(f"{path}: a config file must be a mapping of sections (model/training/data)")
    unknown = sorted(set(raw) - {"model", "training", "data"} - _MODULARFORGE_IGNORED_SECTIONS)
    if unknown:
        raise ForgeError(f"{path}: unknown section(s) {', '.join(unknown)}; expected model, training, data")
    translated, ignored = _translate_modularforge(raw, str(path))
    return translated, ignored, path


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown config key '{loc}'; run `forge-ds train --help` for the list of keys"
    if first["type"] == "value_error":
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    got = first.get("input")
    return f"{where}: {loc}={got!r} is invalid ({first['msg']})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in ("model", "training", "data"):
        raise ForgeError(f"command line: unknown option --{dotted}; config flags look like "
                         "--model.d_model=256 (see `forge-ds train --help`)")
    tree.setdefault(parts[0], {})[parts[1]] = value


def resolve(config: Optional[str] = None, overrides: Optional[dict] = None) -> tuple[Config, list[str]]:
    """Defaults < config file (path or preset) < dotted CLI overrides. Returns (config, notes to print)."""
    tree: dict = {}
    notes: list[str] = []
    where = "defaults"
    if config:
        tree, ignored, path = read_config_file(config)
        where = str(path)
        if ignored:
            notes.append(f"note: {path.name}: ignored Phase-2/3 keys: {', '.join(ignored)}")
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ForgeError(_format_validation_error(e, where)) from None
    if overrides:
        cli_tree: dict = {}
        for key, value in overrides.items():
            _set_dotted(cli_tree, key, value)
        merged = cfg.model_dump()
        for section, values in cli_tree.items():
            merged[section].update(values)
        try:
            cfg = Config.model_validate(merged)
        except ValidationError as e:
            raise ForgeError(_format_validation_error(e, "command line")) from None
    return cfg, notes


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def load_saved(path: Path) -> Config:
    """Read a config.yaml that forge_ds wrote beside a checkpoint or export."""
    try:
        return Config.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise ForgeError(f"{path}: cannot read the saved config ({type(e).__name__}); is this a forge_ds run?") from None


def modularforge_yaml(cfg: Config) -> str:
    """A ModularForge config whose model/training sections match this run, ready for Phase 2."""
    m, t, d = cfg.model, cfg.training, cfg.data
    doc = {
        "model": {**m.model_dump()},
        "training": {"learning_rate": t.learning_rate, "batch_size": t.batch_size, "epochs_shared": t.epochs_shared,
                     "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
                     "gradient_accumulation_steps": t.gradient_accumulation_steps, "seed": t.seed,
                     "use_amp": t.precision != "fp32", "device": t.device},
        "data": {"tokenizer_vocab_size": m.vocab_size},
    }
    if d.source.startswith("hf:"):
        name, _, conf = d.source[3:].partition(":")
        doc["data"]["dataset_name"] = name
        if conf:
            doc["data"]["dataset_config"] = conf
    return yaml.safe_dump(doc, sort_keys=False)


def help_text() -> str:
    """Every config field with its type and default (fire cannot see dotted fields, so we list them)."""
    lines = []
    for section, model in (("model", ModelConfig), ("training", TrainingConfig), ("data", DataConfig)):
        for name, field in model.model_fields.items():
            ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
            lines.append(f"  --{section}.{name:<28} {ann:<40} default {field.default!r}")
    return "\n".join(lines)
