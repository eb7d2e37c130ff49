"""Loss and learning-rate plots from the CSV logs the engine writes."""
from __future__ import annotations

import csv
from pathlib import Path


def read_log(path: Path | str) -> tuple[dict[str, str], list[str], list[list[float]]]:
    """-> (header key/values, column names, rows). Rows before the "Step" line are the header."""
    header: dict[str, str] = {}
    columns: list[str] = []
    rows: list[list[float]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.reader(f):
            if not rec:
                continue
            if not columns:
                if rec[0] == "Step":
                    columns = rec
                elif len(rec) >= 2:
                    header[rec[0]] = rec[1]
                continue
            rows.append([float(x) for x in rec])
    if not columns:
        raise ValueError(f"{path}: not a TrainTrain log (no 'Step' row)")
    return header, columns, rows


def plot_log(csv_path: Path | str, png_path: Path | str | None = None):
    """Draw loss (raw and smoothed) and every learning rate against the step.

    Returns the matplotlib Figure; writes a PNG when png_path is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    header, columns, rows = read_log(csv_path)
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot(1, 1, 1)
    steps = [r[0] for r in rows]
    if rows:
        ax.plot(steps, [r[1] for r in rows], color="#f4a4a4", linewidth=0.8, label=columns[1])
        ax.plot(steps, [r[2] for r in rows], color="#c00000", linewidth=1.8, label=columns[2])
    ax.set_xlabel("Step")
    ax.set_ylabel("Loss")
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    for i, name in enumerate(columns[3:], start=3):
        lr_ax.plot(steps, [r[i] for r in rows], linestyle="--", label=name)
    lr_ax.set_ylabel("Learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ax.set_title(header.get("save_lora_name", Path(csv_path).stem))
    if png_path is not None:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, dpi=80)
    return fig
