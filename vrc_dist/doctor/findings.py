"""What the doctor reports: findings with a level, a path and a message, and their text and JSON forms."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa

ERROR, WARNING = "error", "warning"
_SHOWN = 5  # examples listed per finding


@dataclass
class Finding:
    level: str  # error | warning
    where: str  # the file or directory concerned
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.where}: {self.message}"


class Report:
    def __init__(self):
        self.findings: list[Finding] = []

    def error(self, where, message: str) -> None:
        self.findings.append(Finding(ERROR, str(where), message))

    def warn(self, where, message: str) -> None:
        self.findings.append(Finding(WARNING, str(where), message))


def examples(items) -> str:
    items = list(items)
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(map(str, items[:_SHOWN])) + more


def format_findings(path, kind: str | None, findings: list[Finding]) -> str:
    errors = sum(f.level == ERROR for f in findings)
    warnings = len(findings) - errors
    lines = [str(f) for f in findings]
    what = {"metrics": "metrics output", "codebook": "codebook"}.get(kind, "directory")
    lines.append(f"{what} {path}: " + ("OK" if not findings else f"{errors} error(s), {warnings} warning(s)"))
    return "\n".join(lines)


def findings_json(path, kind, findings) -> str:
    return json.dumps({"path": str(path), "kind": kind, "ok": not any(f.level == ERROR for f in findings),
                       "findings": [asdict(f) for f in findings]}, indent=1)


def _type_name(t: pa.DataType) -> str:
    # Parquet renames a list's child field (item -> element); only the value type and size matter.
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{t.value_type}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{t.value_type}>"
    return str(t)


def schema_diff(actual: pa.Schema, expected: pa.Schema) -> str | None:
    got = [(f.name, _type_name(f.type)) for f in actual]
    want = [(f.name, _type_name(f.type)) for f in expected]
    if got == want:
        return None
    missing = [n for n, _ in want if n not in dict(got)]
    wrong = [f"{n}: {t} (expected {dict(want)[n]})" for n, t in got if n in dict(want) and dict(want)[n] != t]
    extra = [n for n, _ in got if n not in dict(want)]
    parts = ([f"missing {missing}"] if missing else []) + ([f"wrong types {wrong}"] if wrong else []) + (
        [f"unexpected {extra}"] if extra else [])
    return "schema differs from the contract: " + ("; ".join(parts) or "column order differs")
