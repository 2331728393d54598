"""Consistency checks of what vrc-dist wrote: a metrics output directory or a codebook directory.

`check(path)` returns findings; `vrc doctor PATH` prints them and exits non-zero when any is an error.
Nothing here writes or repairs: the doctor reads, and says what is wrong and where.

Metrics directory (doctor/metrics.py; format: build/schema.py): the manifest's format and version fields;
for every shard the manifest lists as done, its three Parquet files exist, have the contract schemas, hold exactly the row counts the
manifest records, and agree with each other (tokens of ok images only, one candidate row per token flagged
`candidate`); no (key, token_index) twice over the whole dataset; finite candidate vectors; no temporary
files left by a killed writer; files of shards the manifest does not count are reported.

Codebook directory (doctor/codebook.py; format: codebook/format.py): manifest fields; every vNNNN directory
complete (SHA256SUMS) with matching checksums; manifest versions vs directories; vectors [N, dim], finite; provenance, FAISS index and
params.json consistent with them; temporary directories left by a crashed commit; every pool file's sha256
equal to its name, every version's pool entries present, pool files no version lists and temporary pool
files (both left by a crashed commit, harmless) reported.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrc_dist.build.schema import FORMAT as METRICS_FORMAT
from vrc_dist.codebook.format import FORMAT as CODEBOOK_FORMAT
from vrc_dist.doctor.codebook import check_codebook
from vrc_dist.doctor.findings import ERROR, WARNING, Finding, Report, findings_json, format_findings
from vrc_dist.doctor.metrics import check_metrics

__all__ = ["ERROR", "WARNING", "Finding", "check", "findings_json", "format_findings", "kind_of"]


def kind_of(path: Path) -> str | None:
    """'metrics', 'codebook', or None, from the directory's manifest."""
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == METRICS_FORMAT:
        return "metrics"
    if data.get("format") == CODEBOOK_FORMAT:
        return "codebook"
    return None


def check(path: str | Path) -> tuple[str | None, list[Finding]]:
    """(kind, findings) for a metrics or codebook directory."""
    path = Path(path)
    report = Report()
    if not path.is_dir():
        report.error(path, "not a directory")
        return None, report.findings
    if not (path / "manifest.json").exists():
        from vrc_dist.codebook.format import has_version_dirs

        if has_version_dirs(path):
            report.error(path, f"no manifest.json but codebook version directories: rebuild it with "
                               f"`vrc codebook repair {path}`")
        else:
            report.error(path, "no manifest.json: neither a metrics output directory nor a codebook")
        return None, report.findings
    kind = kind_of(path)
    if kind == "metrics":
        check_metrics(path, report)
    elif kind == "codebook":
        check_codebook(path, report)
    else:
        try:
            data = json.loads((path / "manifest.json").read_text())
            fmt = data.get("format") if isinstance(data, dict) else None
            from vrc_dist.codebook.format import FORMAT

            report.error(path / "manifest.json", f"codebook format {fmt!r}, this code reads {FORMAT!r}: rebuild it"
                         if str(fmt).startswith("vrc-codebook/") else
                         f"unknown format {fmt!r}: not a vrc-dist metrics or codebook manifest")
        except (OSError, ValueError) as e:
            report.error(path / "manifest.json", f"not valid JSON: {e}")
    return kind, report.findings
