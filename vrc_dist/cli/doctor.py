"""`vrc doctor PATH`: check a metrics output directory or a codebook for consistency; non-zero if not."""
from __future__ import annotations

from vrc_dist.doctor import ERROR, check, findings_json, format_findings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="check a metrics output directory or a codebook directory; exit 1 if anything is wrong")
    p.add_argument("path", help="a `vrc build` output directory or a codebook directory")
    p.add_argument("--strict", action="store_true", help="warnings (failed shards, stale files) fail too")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    kind, findings = check(args.path)
    print(findings_json(args.path, kind, findings) if args.json else format_findings(args.path, kind, findings))
    failing = findings if args.strict else [f for f in findings if f.level == ERROR]
    return 1 if failing else 0
