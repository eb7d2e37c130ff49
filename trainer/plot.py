"""Loss and learning-rate plots from the CSV logs the engine writes."""
from __future__ import annotations

import csv
import math
from pathlib import Path


class PlotError(ValueError):
    """A log file that cannot be drawn; the message names the file and what is wrong."""


def read_log(path: Path | str) -> tuple[dict[str, str], list[str], list[list[float]]]:
    """-> (header key/values, column names, rows). Rows before the "Step" line are the header.

    Non-finite values ("inf", "nan") are read as they are; PlotError for anything that is not a
    TrainTrain log (missing, a folder, binary, no "Step" row, a cell that is not a number)."""
    header: dict[str, str] = {}
    columns: list[str] = []
    rows: list[list[float]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line_no, rec in enumerate(csv.reader(f), start=1):
                if not rec:
                    continue
                if not columns:
                    if rec[0] == "Step":
                        columns = rec
                        if len(columns) < 3 or columns[1] != "Loss":
                            raise PlotError(f"{path}: line {line_no}: the Step row has {len(columns)} columns "
                                            f"({', '.join(c[:20] for c in columns[:4])}); a TrainTrain log has "
                                            f"Step, Loss, (smoothed loss,) and learning rates")
                    elif len(rec) >= 2:
                        header[rec[0]] = rec[1]
                    continue
                if len(rec) != len(columns):
                    raise PlotError(f"{path}: line {line_no} has {len(rec)} values, the Step row {len(columns)}")
                try:
                    rows.append([float(x) for x in rec])
                except ValueError:
                    bad = next(x for x in rec if not _is_number(x))
                    raise PlotError(f"{path}: line {line_no}: {bad[:40]!r} is not a number") from None
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PlotError(f"{path}: is a folder, not a CSV log") from None
    except UnicodeDecodeError:
        raise PlotError(f"{path}: not a text file (a TrainTrain log is UTF-8 CSV)") from None
    except (csv.Error, ValueError) as e:  # NUL bytes, a field over csv's limit
        if isinstance(e, PlotError):
            raise
        raise PlotError(f"{path}: not a CSV log ({e})") from None
    except OSError as e:
        raise PlotError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not columns:
        raise PlotError(f"{path}: not a TrainTrain log (no 'Step' row)")
    return header, columns, rows


def log_columns(columns: list[str]) -> tuple[int | None, int, list[int]]:
    """(raw loss column or None, smoothed loss column, learning-rate columns), read from the header.

    Two layouts: ours ``Step, Loss, Loss (smoothed), Learning Rate 1…k`` (raw, then smoothed) and the
    original TrainTrain's ``Step, Loss, Learning Rate 1…k``, whose "Loss" is already the smoothed
    (EMA) loss; reading by position would draw its first learning rate as the smoothed loss."""
    if len(columns) > 2 and columns[2].startswith("Loss"):
        return 1, 2, list(range(3, len(columns)))
    return None, 1, list(range(2, len(columns)))


def _is_number(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def _finite(values: list[float]) -> list[float]:
    # matplotlib cannot scale an axis to inf; NaN leaves a gap in the line instead
    return [v if math.isfinite(v) else math.nan for v in values]


def plot_log(csv_path: Path | str, png_path: Path | str | None = None, warn=None):
    """Draw loss (raw and smoothed) and every learning rate against the step.

    Returns the matplotlib Figure; writes a PNG when png_path is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    header, columns, rows = read_log(csv_path)
    bad = sum(not math.isfinite(v) for r in rows for v in r)
    if bad and warn is not None:
        warn(f"{csv_path}: {bad} values are inf or NaN; they are left out of the plot")
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in rows if math.isfinite(r[0])]  # a row without a usable step has no place
    steps = [r[0] for r in rows]
    raw, smooth, lrs = log_columns(columns)
    if rows:
        if raw is not None:
            ax.plot(steps, _finite([r[raw] for r in rows]), color="#f4a4a4", linewidth=0.8, label=columns[raw])
        ax.plot(steps, _finite([r[smooth] for r in rows]), color="#c00000", linewidth=1.8,
                label=columns[smooth] if raw is not None else "Loss (smoothed)")
    ax.set_xlabel("Step")
    ax.set_ylabel("Loss")
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    for i in lrs:
        name = columns[i]
        lr_ax.plot(steps, _finite([r[i] for r in rows]), linestyle="--", label=name)
    lr_ax.set_ylabel("Learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ax.set_title(header.get("save_lora_name", Path(csv_path).stem))
    if png_path is not None:
        from .atomic import atomic_write

        try:  # atomic: a failed write never leaves half a PNG
            atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
        except OSError as e:
            raise PlotError(f"{png_path}: cannot be written ({e.strerror or e})") from None
    return fig
