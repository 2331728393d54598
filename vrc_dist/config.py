"""Typed configuration: dataclasses loaded from YAML/TOML, overridable with `section.key=value`.

Defaults are the reference values of DESIGN.md §2. Unknown keys and wrong types are errors that
name the offending key: a typo in a threshold must never silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TOY_CONFIG = Path(__file__).parent / "configs" / "toy.yaml"  # the toy model's calibrated settings
DEFAULT_PROMPT = (
    "What does this image show? You must provide a single word that best describes the image."
)


class ConfigError(ValueError):
    pass


@dataclass
class ProbeConfig:
    """Everything the three probe passes and the per-image filter depend on (DESIGN.md §2 steps 1-7)."""

    model: str = "toy"
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    prompt: str = DEFAULT_PROMPT
    pad_token_id: int | None = None  # None: the tokenizer's pad id, else the model config's
    dup: int = 1
    k_head: int = 50  # single-input pass: softmax over this many top logits
    k_div: int = 10  # divergence: top-k of the intact distribution
    divergence: str = "reference"  # reference | jsd
    window: int = 3  # region leave-one-out window side
    k_region: float = 1.0
    k_global: float = 16.0
    jsd_thres: float = 1.8e-3
    top1_thres: float = 0.15
    image_dpc_k: int = 5
    image_dpc_clusters: int = 8
    cluster_size_thres: int = 8
    token_budget: int = 65536  # max tokens (batch x sequence) in one batched forward
    seed: int = 0


@dataclass
class ClusterConfig:
    """Global DPC-KNN over candidates from all images (DESIGN.md §2 step 8)."""

    k: int = 5
    n_clusters: int = 64
    min_images: int = 64  # keep clusters seen in MORE than this many distinct images
    prototype_mode: str = "members"  # members | centers
    backend: str = "auto"  # auto | exact | faiss | ivf | hnsw
    use_gpu: bool = False
    seed: int = 0


@dataclass
class BuildConfig:
    """A distributed identify run: shards in, Parquet metrics out, then a codebook version."""

    shards: list[str] = field(default_factory=list)
    out: str = "out/build"
    actors: int | None = None  # None: one per GPU, or 2 CPU actors on a CPU-only cluster
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    max_retries: int = 3
    max_image_bytes: int = 64 * 2**20  # a bigger shard member is refused (recorded), not read into memory
    overwrite: bool = False
    codebook: str | None = None  # codebook directory to commit into; None: metrics only
    codebook_name: str | None = None
    new_lineage: bool = False  # let a build with other probe settings become the codebook's latest version
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _check_type(value, tp, where: str):
    """Return value coerced to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: expected {tp.__name__}, got a boolean")
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls, data, where: str = "config"):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data or {}


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place; value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` from an optional YAML/TOML file, then apply `key=value` overrides."""
    data = read_config_file(path) if path else {}
    for o in overrides or []:
        apply_override(data, o)
    return from_dict(cls, data)


def load_probe_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ProbeConfig:
    """A ProbeConfig from a probe file, or from the `probe:` section of a build file such as
    vrc_dist/configs/toy.yaml, so one file holds a model's calibrated thresholds for every command.

    Without a file, the toy model (`model: toy`, the default) starts from that file's probe section: the
    reference defaults were set for 7B models and find no candidates on it (README, "Using it"). Any other
    model starts from the reference defaults."""
    data = read_config_file(path) if path else {}
    data = data.get("probe", {}) if "probe" in data else data
    for o in overrides or []:
        apply_override(data, o)
    if not path and data.get("model", ProbeConfig.model) == "toy":
        data = {**read_config_file(TOY_CONFIG)["probe"], **data}
    return from_dict(ProbeConfig, data, "probe")


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
