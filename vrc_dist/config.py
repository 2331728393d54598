"""Typed configuration: dataclasses loaded from YAML/TOML, overridable with `section.key=value`.

Defaults are the reference values of docs/METHOD.md. Unknown keys and wrong types are errors that
name the offending key: a typo in a threshold must never silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TOY_CONFIG = Path(__file__).parent / "configs" / "toy.yaml"  # the toy model's calibrated settings
PRESETS = Path(__file__).parent / "configs"  # package data: `--preset NAME` is PRESETS / NAME.yaml
# Probe settings added after metrics datasets and codebooks were first recorded: a record without them was
# made with these values (recorded_probe fills them in before settings are compared).
PROBE_ADDED = {"tokens": "all", "conversation": "template", "skip_leading_a": False}
DEFAULT_PROMPT = (
    "What does this image show? You must provide a single word that best describes the image."
)
# Defaults used by more than one signature, written once here.
DEFAULT_TOKEN_BUDGET = 65536  # max tokens (batch x sequence) in one batched forward of the probe
FASTV_LAYER = 2  # FastV's K: visual tokens are ranked by the attention of layer K - 1 and pruned after it
MAX_MEMBER_BYTES = 64 * 2**20  # a bigger shard member ("image") is a decompression bomb or a mistake, not a photo


class ConfigError(ValueError):
    pass


# Ranges, as field metadata: from_dict checks them with the types, so a bad value is refused at load,
# before Ray or a model starts, with a line that names the key.
def at_least(lo):
    return {"check": (lambda v: v >= lo, f"must be >= {lo}")}


ODD = {"check": (lambda v: v >= 1 and v % 2 == 1, "must be an odd number >= 1 (a window centred on its token)")}
CONVERSATIONS = ("template", "llava_v1")


def one_of(options):
    return {"check": (lambda v: v in options, f"must be one of {', '.join(options)}")}


def parse_token_ranks(spec) -> list[tuple[int, int]] | None:
    """`probe.tokens` as 1-based inclusive (first, last) [CLS]-similarity rank ranges; None for `all`.

    Accepts "all", one rank (5), "a-b" ranges joined by commas ("1-24,37-44"), or a list of those. The
    ranges must ascend without overlapping, so a typo never silently probes a different set."""
    if spec == "all":
        return None
    items = spec if isinstance(spec, list) else [spec]
    parts = [p.strip() if isinstance(p, str) else p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
    ranges = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", str(part))
        if isinstance(part, bool) or m is None:
            raise ConfigError(f"probe.tokens: {part!r} is not a rank or a range like 1-24")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo < 1 or hi < lo:
            raise ConfigError(f"probe.tokens: {part!r}: ranks are 1-based and a range runs low-high")
        if ranges and lo <= ranges[-1][1]:
            raise ConfigError(f"probe.tokens: {part!r} does not come after {ranges[-1][0]}-{ranges[-1][1]}; "
                              "ranges must ascend without overlapping")
        ranges.append((lo, hi))
    if not ranges:
        raise ConfigError("probe.tokens: an empty list; use `all` or rank ranges like 1-24,37-44")
    return ranges


def _valid_token_ranks(spec) -> bool:
    parse_token_ranks(spec)  # raises a ConfigError that says what is wrong
    return True


TOKEN_RANKS = {"check": (_valid_token_ranks, "must be `all` or 1-based [CLS]-similarity rank ranges")}
# PyYAML (YAML 1.1) reads `1e-3`, with no dot, as a string; a float field takes it as the number it is.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class ProbeConfig:
    """Everything the three probe passes and the per-image filter depend on (docs/METHOD.md steps 1-7)."""

    model: str = "toy"
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    prompt: str = DEFAULT_PROMPT
    pad_token_id: int | None = None  # None: the tokenizer's pad id, else the model config's
    dup: int = field(default=1, metadata=at_least(1))
    k_head: int = field(default=50, metadata=at_least(1))  # single-input pass: softmax over this many top logits
    k_div: int = field(default=10, metadata=at_least(1))  # divergence: top-k of the intact distribution
    divergence: str = "reference"  # reference | jsd
    window: int = field(default=3, metadata=ODD)  # region leave-one-out window side
    k_region: float = field(default=1.0, metadata=at_least(0))
    k_global: float = field(default=16.0, metadata=at_least(0))
    jsd_thres: float = field(default=1.8e-3, metadata=at_least(0))
    top1_thres: float = field(default=0.15, metadata=at_least(0))
    image_dpc_k: int = field(default=5, metadata=at_least(1))
    image_dpc_clusters: int = field(default=8, metadata=at_least(1))
    cluster_size_thres: int = field(default=8, metadata=at_least(0))
    # max tokens (batch x sequence) in one batched forward
    token_budget: int = field(default=DEFAULT_TOKEN_BUDGET, metadata=at_least(1))
    seed: int = 0
    # which tokens are probed: `all`, or 1-based [CLS]-similarity rank ranges ("1-24,37-44" or a list);
    # un-probed tokens keep their row in the tokens table with NaN metrics and are never candidates
    tokens: str | int | list[str | int] = field(default="all", metadata=TOKEN_RANKS)
    conversation: str = field(default="template", metadata=one_of(CONVERSATIONS))  # template | llava_v1
    # when a pass's first greedy token is "▁A", read the next step's logits instead (the reference scripts)
    skip_leading_a: bool = False


@dataclass
class ClusterConfig:
    """Global DPC-KNN over candidates from all images (docs/METHOD.md step 8)."""

    k: int = field(default=5, metadata=at_least(1))
    n_clusters: int = field(default=64, metadata=at_least(1))
    # keep clusters seen in MORE than this many distinct images
    min_images: int = field(default=64, metadata=at_least(0))
    prototype_mode: str = "members"  # members | centers
    backend: str = "auto"  # auto | exact | faiss | ivf | hnsw
    use_gpu: bool = False
    seed: int = 0


@dataclass
class BuildConfig:
    """A distributed identify run: shards in, Parquet metrics out, then a codebook version."""

    shards: list[str] = field(default_factory=list)
    # `pipe:` shard URLs run a shell command (webdataset's convention); a config file must opt in to them
    allow_pipe_shards: bool = False
    out: str = "out/build"
    # None: one per GPU, or 2 CPU actors on a CPU-only cluster
    actors: int | None = field(default=None, metadata=at_least(1))
    gpus_per_actor: float = field(default=1.0, metadata=at_least(0))
    cpus_per_actor: float = field(default=1.0, metadata=at_least(0))
    max_retries: int = field(default=3, metadata=at_least(0))
    # a bigger shard member is refused (recorded), not read into memory
    max_image_bytes: int = field(default=MAX_MEMBER_BYTES, metadata=at_least(1))
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
    if tp is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
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
    return check_ranges(cls(**kwargs), where, recurse=False)


def check_ranges(cfg, where: str = "config", recurse: bool = True):
    """Raise ConfigError naming the first field of `cfg` outside its range; returns `cfg`. For a config
    changed after loading (flags set as attributes), with recurse=True into its sections."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if recurse:
                check_ranges(value, f"{where}.{f.name}")
        elif "check" in f.metadata and value is not None:
            ok, rule = f.metadata["check"]
            if not ok(value):
                raise ConfigError(f"{where}.{f.name}: {value!r} {rule}")
    return cfg


def add_config_arguments(p, config_help: str, set_help: str = "override, e.g. probe.k_global=8",
                         presets: bool = False) -> None:
    """The one `--config FILE` / `--set KEY=VALUE` option block of every command that loads a config; with
    `presets`, also `--preset NAME`, a shipped config instead of a file (config_source)."""
    p.add_argument("--config", help=config_help)
    if presets:
        p.add_argument("--preset", help="a shipped config by name instead of --config, e.g. reference-llava15 "
                                        "(vrc_dist/configs/NAME.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


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
    _refuse_pipe_shards(data or {}, path)
    return data or {}


def _refuse_pipe_shards(data: dict, path: Path) -> None:
    """A config file received from someone else must not run commands here unless it says so openly.
    Shards typed on the command line (`--shards`, `--set`) are the user's own and need no opt-in."""
    shards = data.get("shards") or []
    piped = [s for s in ([shards] if isinstance(shards, str) else shards) if str(s).startswith("pipe:")]
    if piped and data.get("allow_pipe_shards") is not True:
        raise ConfigError(f"{path}: shard {piped[0]!r} is a pipe: URL, which runs a shell command; a config "
                          "file must opt in with `allow_pipe_shards: true`")


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


def recorded_probe(settings: dict) -> dict:
    """Recorded probe settings with the later-added ones at the values they were made with."""
    return {**PROBE_ADDED, **settings}


def preset_path(name: str) -> Path:
    """The shipped config file of preset `name` (vrc_dist/configs/NAME.yaml), or a ConfigError listing them."""
    path = PRESETS / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConfigError(f"preset {name!r} not found; known presets: {', '.join(known)}")
    return path


def config_source(config: str | None, preset: str | None) -> str | Path | None:
    """The file behind `--config PATH` or `--preset NAME` (not both)."""
    if config and preset:
        raise ConfigError("give --config or --preset, not both")
    return preset_path(preset) if preset else config
