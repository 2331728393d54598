"""The evaluation's outputs: results.csv and results.md (one row per method and keep), and the accuracy plot."""
from __future__ import annotations

import csv
from pathlib import Path

HEAD_COLUMNS = ["method", "keep", "kept_tokens", "accuracy", "acc_lo", "acc_hi", "relative", "vs_null", "vs_null_lo",
                "vs_null_hi"]
TAIL_COLUMNS = ["prefill_gflops", "llm_prefill_ms", "select_ms", "forward_ms", "questions"]


def columns(rows: list[dict], question_types=()) -> list[str]:
    """The table's columns: the fixed ones, with an acc_<type> per question type between them (the types in
    `question_types` first, in that order, then any others as they first appear)."""
    seen = dict.fromkeys(k for r in rows for k in r if k.startswith("acc_") and k not in HEAD_COLUMNS)
    per_type = [f"acc_{t}" for t in question_types if f"acc_{t}" in seen] + [k for k in seen
                                                                             if k[4:] not in question_types]
    return [c for c in HEAD_COLUMNS if any(c in r for r in rows)] + per_type + [
        c for c in TAIL_COLUMNS if any(c in r for r in rows)]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], out: Path, header: str, question_types=()) -> None:
    cols = columns(rows, question_types)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], out: Path, title: str = "accuracy vs kept visual tokens") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["kept_tokens"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log")
    ticks = []
    for t in sorted({r["kept_tokens"] for r in rows}):
        if not ticks or t > 1.15 * ticks[-1]:  # labels of near-equal counts (pool's 30 vs 32) would overlap
            ticks.append(t)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens kept per image (log scale)")
    ax.set_ylabel("accuracy (first answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_kept.png", dpi=120)
    plt.close(fig)
