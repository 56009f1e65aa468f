"""Tables, image grids and trade-off plots of a run folder (re-rendered by `guidance-eval report`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from PIL import Image

from guidance.atomic import atomic_write, atomic_write_text

TABLE_COLUMNS = ("setting", "fid", "kid_mean", "precision", "recall", "class_accuracy", "clip_score",
                 "saturation_mean", "colourfulness_mean", "nfe_per_image", "guide_nfe_per_image",
                 "perturbed_nfe_per_image", "seconds_per_image")
# Columns that a row may lack, with the value that absence means: rows of settings without a guide model or a
# perturbed branch (and of runs made before those were counted) made no such evaluation.
DEFAULTS = {"guide_nfe_per_image": 0.0, "perturbed_nfe_per_image": 0.0}


def write_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """uint8 (N, 3, H, W) -> one PNG grid (torchvision's make_grid, white where a row is short)."""
    from torchvision.utils import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=columns, padding=0, pad_value=255)
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(f, format="PNG"))


def load_rows(out: Path) -> list[dict]:
    results = Path(out) / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: is {out} a guidance-eval run folder (with at least "
                                "one finished setting)?")
    try:
        rows = json.loads(results.read_text())["rows"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{results} is damaged ({type(e).__name__}: {e}); rerun the same `guidance-eval run` "
                         "command to write it again from the checkpoints") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "label" in r and "scale" in r for r in rows):
        raise ValueError(f"{results}: 'rows' is not a list of result rows; rerun the `guidance-eval run` command")
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the columns that any row has."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, DEFAULTS.get(c, ""))
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "strategy"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys + ["strategy"])
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r.get(k, DEFAULTS.get(k, "")) for k in keys}, "strategy": json.dumps(r.get("strategy"))})
    atomic_write_text(path, text.getvalue())


def _curves(rows: list[dict]) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for r in rows:
        curves.setdefault(r["label"], []).append(r)
    return {label: sorted(rs, key=lambda r: r["scale"]) for label, rs in curves.items()}


def plot_curves(rows: list[dict], x: str, y: str, path: Path) -> bool:
    """One curve per strategy through its scales: a metric against the scale (x = "scale"), or a
    trade-off such as FID against class accuracy (points then annotated with their scale)."""
    # A bare Figure (no pyplot): drawing files never switches the caller's backend (e.g. a notebook's).
    from matplotlib.figure import Figure

    if not any(x in r and y in r for r in rows):
        return False
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, rs in _curves(rows).items():
        pts = [(r[x], r[y], r["scale"]) for r in rs if x in r and y in r]
        if not pts:
            continue
        xs, ys, _ = zip(*pts)
        ax.plot(xs, ys, marker="o", label=label)
        for px, py, s in pts if x != "scale" else ():
            ax.annotate(f"{s:g}", (px, py), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("guidance scale w" if x == "scale" else x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_report(out: str | Path) -> str:
    """results.csv, table.md and plots/*.png from results.json; returns the table text."""
    out = Path(out)
    rows = load_rows(out)
    write_csv(rows, out / "results.csv")
    table = format_table(rows)
    atomic_write_text(out / "table.md", table + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for metric in ("fid", "class_accuracy", "clip_score", "saturation_mean", "precision", "recall", "nfe_per_image",
                   "guide_nfe_per_image", "perturbed_nfe_per_image"):
        plot_curves(rows, "scale", metric, plots / f"{metric}_vs_scale.png")
    for x in ("class_accuracy", "clip_score", "saturation_mean"):
        plot_curves(rows, x, "fid", plots / f"fid_vs_{x}.png")
    return table

