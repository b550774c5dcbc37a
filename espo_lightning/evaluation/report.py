"""What ``validate`` prints at its end (rank 0): every set's metrics as a table, and where the
summary went.

    evaluated runs/quickstart/checkpoints/last.ckpt (step 240)
    set  problems  mode      metric                 value
    val       300  greedy    val/accuracy          0.7433
                             val/response_len_mean 3.9900
                             val/truncated_frac    0.0000
    eval_summary.json: runs/quickstart/lightning_logs/version_1/eval_summary.json

Metric names are the logged ones (``val/accuracy``, ``val/<set>/pass@8``, ...); values have four
decimals (the summary JSON keeps every digit)."""
from __future__ import annotations

from pathlib import Path

HEADER = ("set", "problems", "mode", "metric", "value")


def format_report(summary: dict, summary_path: str | Path | None) -> str:
    """The table of ``summary`` (``Evaluator.last_summary``: the layout of ``eval_summary.json``)."""
    source = summary.get("ckpt_path") or summary.get("model")
    lines = [f"evaluated {source} (step {summary.get('step')})"]
    rows = []
    for name, entry in summary.get("sets", {}).items():
        mode = "greedy" if entry.get("greedy") else f"k={entry.get('k')}"
        metrics = entry.get("metrics") or {"(no problems)": None}
        for i, (metric, value) in enumerate(metrics.items()):
            first = i == 0
            rows.append((name if first else "", str(entry.get("problems", "")) if first else "",
                         mode if first else "", metric, "-" if value is None else f"{value:.4f}"))
    if rows:
        widths = [max(len(row[c]) for row in [HEADER, *rows]) for c in range(len(HEADER))]
        right = {1, 4}  # numbers right-aligned
        for row in [HEADER, *rows]:
            cells = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("no evaluation sets (data.val_data is empty)")
    lines.append(f"eval_summary.json: {summary_path}" if summary_path is not None
                 else "eval_summary.json: not written (the trainer has no logger, so no log folder)")
    return "\n".join(lines)
