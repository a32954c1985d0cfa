"""The one typed config: model / training / data, resolved once as defaults < file < CLI.

The dataclass defaults are ModularForge's `configs/default.yaml` values (the contract), so a bare run trains
ModularForge's model. A config file may be ours (sections model/training/data), a preset name from
`forge_ds/presets/`, or ModularForge's own YAML: its Phase-1 keys are translated, its Phase-2/3 keys ignored
with one note, anything else unknown is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forge_ds.errors import ForgeError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class _Section(BaseModel):
    # extra="forbid": a typo in a key must fail loudly, not train the wrong model for an hour.
    # validate_assignment: CLI overrides go through the same type checks as file values.
    # allow_inf_nan=False: a NaN rate or norm would otherwise reach DeepSpeed and train to exit 0 on garbage.
    # The bounds are declared on the fields (Field(ge=…)): pydantic checks them before any model validator runs,
    # so Config._check_consistency never sees n_heads=0 (it divides by it).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    d_model: int = Field(512, ge=1)
    n_heads: int = Field(8, ge=1)
    n_layers: int = Field(4, ge=1)
    d_ff: int = Field(2048, ge=1)
    vocab_size: int = 16384  # bounds in Config._check_consistency: the right lower one depends on data.tokenizer
    max_seq_len: int = Field(512, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class TrainingConfig(_Section):
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(16, ge=1)  # per data-parallel rank, as in ModularForge
    epochs_shared: int = Field(3, ge=1)
    # when set, overrides epochs_shared; either one defines the LR schedule
    max_steps: Optional[int] = Field(None, ge=1)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping (DeepSpeed's gradient_clipping=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = Field(42, ge=0)
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_max_batches: Optional[int] = Field(None, ge=1)  # None: the whole validation split
    keep_checkpoints: int = Field(3, ge=1)
    export: Literal["final", "best"] = "final"
    recipe: Literal["balanced", "modularforge"] = "balanced"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)  # processes preparing batches ahead of the step (tokenizing: data.num_proc)
    compile: bool = False
    activation_checkpointing: bool = False
    max_skipped_steps: int = Field(20, ge=0)  # fp16 overflow steps in a row before we call it divergence


class DataConfig(_Section):
    source: str = "builtin:pydoc"
    text_field: str = "text"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    tokenizer: Optional[str] = None
    prepared_dir: Optional[str] = None
    min_article_length: int = Field(0, ge=0)
    max_articles: Optional[int] = Field(None, ge=1)
    tokenizer_train_bytes: int = Field(1 << 30, ge=1)  # the BPE sample bound; 1 GiB covers WikiText-103 whole
    num_proc: Optional[int] = Field(None, ge=1)  # encoding processes; None: the cores this process may use, at run time


class Config(_Section):
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        m, d = self.model, self.data
        if m.d_model % m.n_heads:
            raise ValueError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                             "choose n_heads that divides d_model")
        if m.vocab_size <= 4:
            raise ValueError(f"model.vocab_size={m.vocab_size} leaves no room beside the 4 special tokens "
                             "(<pad> <unk> <bos> <eos>); use at least 260 for byte-level BPE")
        if m.vocab_size < 260 and d.tokenizer is None:  # checked here, not after data loading, to fail in seconds
            raise ValueError(f"model.vocab_size={m.vocab_size} is too small for the byte-level BPE forge_ds trains "
                             "(256 byte symbols + 4 special tokens); use at least 260, or give --data.tokenizer")
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


# pydantic's error types for a value of the right type outside its declared bounds.
_BOUND_ERRORS = {"finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown config key '{loc}'; run `forge-ds train --help` for the list of keys"
    if first["type"] == "value_error":
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    got = first.get("input")
    bound = _field_bound(first["loc"]) if first["type"] in _BOUND_ERRORS else None
    if bound:  # the value as typed (nan, not 'nan'), and the bound read off the field, not pydantic's wording
        shown = got if isinstance(got, (int, float, str)) else repr(got)
        return f"{where}: {loc}={shown} is invalid (must be {bound})"
    return f"{where}: {loc}={got!r} is invalid ({first['msg']})"


def _field_bound(loc: tuple) -> Optional[str]:
    """The declared bound of the config field at `loc`, in words: 'a finite number > 0', 'a number in [0, 1)',
    'an integer >= 1 or None'. None when `loc` is not a field of ours."""
    model, field = Config, None
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return None
        model = field.annotation
    types = get_args(field.annotation) or (field.annotation,)
    lower = next(((op, getattr(m, attr)) for m in field.metadata for op, attr in ((">", "gt"), (">=", "ge"))
                  if hasattr(m, attr)), None)
    upper = next(((op, getattr(m, attr)) for m in field.metadata for op, attr in (("<", "lt"), ("<=", "le"))
                  if hasattr(m, attr)), None)
    if lower and upper:
        text = (f"a number in {'[' if lower[0] == '>=' else '('}{lower[1]}, "
                f"{upper[1]}{']' if upper[0] == '<=' else ')'}")
    else:
        kind = "an integer" if int in types else "a finite number"
        text = f"{kind} {lower[0]} {lower[1]}" if lower else f"{kind} {upper[0]} {upper[1]}" if upper else kind
    return text + (" or None" if type(None) in types else "")


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
