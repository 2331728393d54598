"""`manifest.json` of a metrics dataset: run configuration, model info, versions and per-shard status."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from vrc_dist.atomic import write_json_atomic
from vrc_dist.build.schema import FORMAT, FORMAT_VERSION, MANIFEST


def versions() -> dict:
    """Versions that change the numbers: recorded with every run so results can be traced."""
    out = {"python": platform.python_version()}
    for dist in ("vrc-dist", "torch", "transformers", "ray", "pyarrow", "webdataset", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """`manifest.json`: run configuration, model info, versions and per-shard status.

    Only the driver writes it (single writer), after each finished shard, atomically.
    A shard entry: url, status (done | failed), error, images_ok, images_error, tokens, candidates,
    seconds, attempts. `done` means its three files are in place; `error` on a done shard notes input
    that broke off (truncated, empty); `failed` shards are run again by the next run.
    """

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def create(cls, out_dir: str | Path, config: dict) -> Manifest:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": utc_now(),
            "updated": utc_now(),
            "config": config,
            "divergence": config.get("probe", {}).get("divergence"),
            "model_info": None,
            "versions": versions(),
            "shards": {},
            "runs": [],
        }
        return cls(Path(out_dir) / MANIFEST, data)

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest | None:
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a vrc-dist metrics manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {data.get('format_version')}, this code reads {FORMAT_VERSION}")
        return cls(path, data)

    @property
    def shards(self) -> dict:
        return self.data["shards"]

    def done(self) -> list[str]:
        return sorted(name for name, entry in self.shards.items() if entry["status"] == "done")

    def record_shard(self, name: str, entry: dict) -> None:
        self.shards[name] = entry
        self.save()

    def save(self) -> None:
        self.data["updated"] = utc_now()
        write_json_atomic(self.path, self.data, indent=1)
