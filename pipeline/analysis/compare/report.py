"""report.html: one self-contained page (every chart an inline base64 PNG, an inline style, no script,
no link): the table of runs, IoU per class, the differences as a forest plot, confusion matrices,
speed against accuracy, the images where the runs disagree most, the receptive fields when asked,
and how the numbers were made. The charts are matplotlib's (the `report` extra)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipeline.analysis.compare.masks import CONFIDENT, disagreement
from pipeline.analysis.compare.result import Comparison, excludes_zero, iter_pairs
from pipeline.analysis.compare.sources import Sources, label_classes, read_label, read_photo
from pipeline.analysis.compare.tables import LOWER_IS_BETTER, SUMMARY_SCALARS
from pipeline.metrics.cod import KEYS as COD_KEYS
from pipeline.metrics.semantic import LabelReadingError

RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# class colours: distinct on a photo and against each other (the first ten are matplotlib's tab10, reordered)
CLASS_COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
]  # fmt: skip
THUMB = 240  # the longer side of each picture in the disagreement section, in pixels

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232b;
       margin: 0 auto; max-width: 1216px; padding: 24px 32px 48px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ec; }
h3 { font-size: 1.02em; margin: 18px 0 6px; }
p.meta { color: #57606a; margin: 0 0 12px; }
nav a { margin-right: 14px; color: #0b62c4; text-decoration: none; font-size: .92em; }
ul.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px 8px 30px; margin: 12px 0; }
p.note { background: #f4f6f8; border-left: 4px solid #9aa5b1; padding: 8px 12px; }
p.caption, figcaption { color: #57606a; font-size: .88em; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: .86em; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e3e7ec; text-align: right; white-space: nowrap; }
th { background: #f4f6f8; font-weight: 600; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.best { font-weight: 700; }
td.up { color: #1a7f37; font-weight: 600; } td.down { color: #c62828; font-weight: 600; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px;
          border: 1px solid rgba(0,0,0,.25); }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0 12px; }
img.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
figure.case { margin: 18px 0; padding: 12px; border: 1px solid #e3e7ec; border-radius: 6px; }
div.strip { display: flex; flex-wrap: wrap; gap: 10px; }
div.strip figure { margin: 0; text-align: center; }
div.strip img { display: block; image-rendering: pixelated; border: 1px solid #d0d7de; }
code { background: #f4f6f8; padding: 1px 4px; border-radius: 3px; }
"""


def _pyplot():
    """matplotlib's pyplot on the Agg backend (the `report` extra: compare_runs requires it first)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
    return plt


def _figure_uri(plt, fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def class_palette(n: int) -> np.ndarray:
    """n x 3 uint8 class colours: CLASS_COLORS, then golden-ratio hues."""
    import colorsys

    out = [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in CLASS_COLORS[:n]]
    for k in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.95)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _fmt(metric: str, v: Any) -> str:
    """Percentages with 2 decimals for the mmseg metrics, 3 decimals for the binary measures."""
    if not _isnum(v):
        return "–"
    return f"{v:.3f}" if metric in COD_KEYS else f"{100 * v:.2f}"


def _fmt_diff(metric: str, v: Any) -> str:
    if not _isnum(v):
        return "–"
    return f"{v:+.3f}" if metric in COD_KEYS else f"{100 * v:+.2f}"


def _unit(metric: str) -> str:
    return "" if metric in COD_KEYS else " (points)"


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def render_report(result: Comparison, storage_options: dict | None = None) -> str:
    """report.html: one self-contained page (inline PNGs, an inline style, no script, no link)."""
    storage_options = storage_options or {}
    plt = _pyplot()
    colors = {r.label: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(result.runs)}
    notes = list(result.notes)
    sections = [
        _section_table(result, colors),
        _section_per_class(result, colors, plt),
        _section_pairs(result, plt),
        _section_confusion(result, plt),
        _section_speed(result, colors, plt),
        _section_disagreements(result, storage_options),
        *([_section_receptive_field(result)] if result.receptive_fields else []),
        _section_method(result),
    ]
    runs = ", ".join(_esc(r.label) for r in result.runs)
    scope = f"{result.images} images compared, {result.labeled} of them labeled"
    nav = "".join(
        f'<a href="#{sid}">{title}</a>'
        for sid, title in (
            ("comparison-table", "Table"),
            ("per-class-iou", "Per class"),
            ("pairs", "Differences"),
            ("confusion", "Confusion"),
            ("speed-accuracy", "Speed"),
            ("disagreements", "Disagreements"),
            *([("receptive-field", "Receptive field")] if result.receptive_fields else []),
            ("method", "Method"),
        )
    )
    note_html = "<ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>segpipe compare: {runs}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header id='overview'><h1>Segmentation runs compared</h1>\n"
        f"<p class='meta'>{len(result.runs)} runs ({runs}) · {scope} · 95% paired bootstrap over images, "
        f"{result.resamples} resamples, seed {result.seed} · generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>\n"
        f"<nav>{nav}</nav>\n{note_html}</header>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


TEXT_COLUMNS = {"Run", "Model", "Checkpoint", "Status"}
_TEXT = " class='text'"


def _metric_cells(rows: list[dict], metrics: list[str]) -> list[list[str]]:
    """One list of <td> per row: each metric formatted, the best of each column bold."""
    best = {}
    for m in metrics:
        values = [r[m] for r in rows if _isnum(r[m])]
        if values and len(rows) > 1:
            best[m] = min(values) if m in LOWER_IS_BETTER else max(values)
    return [[f"<td{' class=best' if m in best and r[m] == best[m] else ''}>{_fmt(m, r[m])}</td>" for m in metrics] for r in rows]


def _section_table(result: Comparison, colors: dict[str, str]) -> str:
    rows = result.comparison.to_pylist()
    metrics = [m for m in SUMMARY_SCALARS if m in result.comparison.column_names]
    cod = [m for m in COD_KEYS if m in result.comparison.column_names]
    head = ["Run", "Model", "Checkpoint", "Parameters", "Status", "Images", "Errors", "Labeled", "Images/s"]
    head += [f"{m} (%)" for m in metrics]
    body = []
    for r, scores in zip(rows, _metric_cells(rows, metrics)):
        ckpt = r["checkpoint"] or ""
        cells = [
            f"<td class='text'>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</td>",
            f"<td class='text'>{_esc(r['model'])}</td>",
            f"<td class='text' title='{_esc(ckpt)}'>{_esc(PurePosixPath(ckpt).name or ckpt)}</td>",
            f"<td>{r['parameters']:,}</td>" if _isnum(r["parameters"]) else "<td>–</td>",
            f"<td class='text'>{_esc(r['status'])}</td>",
            f"<td>{_esc(r['images'])}</td>",
            f"<td>{_esc(r['errors'] if r['errors'] is not None else '–')}</td>",
            f"<td>{_esc(r['labeled_images'])}</td>",
            f"<td>{r['images_per_second']:.2f}</td>" if _isnum(r["images_per_second"]) else "<td>–</td>",
        ]
        body.append("<tr>" + "".join(cells + scores) + "</tr>")
    header = "".join(f"<th{_TEXT if h in TEXT_COLUMNS else ''}>{h}</th>" for h in head)
    scope = (
        "Metrics over the images every run segmented (--intersect)."
        if result.intersect
        else "Every number is the run's own summary.json (all its images)."
    )
    parts = [
        "<section id='comparison-table'><h2>Runs</h2>",
        f"<div class='scroll'><table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table></div>",
    ]
    if cod:
        cod_head = "<th>Run</th>" + "".join(f"<th>{m}</th>" for m in cod)
        cod_body = "".join(
            f"<tr><td class='text'>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</td>{''.join(scores)}</tr>"
            for r, scores in zip(rows, _metric_cells(rows, cod))
        )
        parts.append("<h3>Camouflaged-object measures (binary task)</h3>")
        parts.append(f"<div class='scroll'><table><thead><tr>{cod_head}</tr></thead><tbody>{cod_body}</tbody></table></div>")
    lower = " MAE: lower is better." if cod else ""
    parts.append(
        f"<p class='caption'>{scope} The best value of each metric is bold.{lower} Images/s: the images every attempt of the run committed, over its attempts' plan seconds (the actors' start-up included, Ray's start-up not).</p></section>"
    )
    return "\n".join(parts)


def _section_per_class(result: Comparison, colors: dict[str, str], plt) -> str:
    rows = result.comparison.to_pylist()
    names = rows[0]["class_names"] if rows else []
    parts = ["<section id='per-class-iou'><h2>IoU per class</h2>"]
    if names:
        c, k = len(names), len(rows)
        fig, ax = plt.subplots(figsize=(min(16, max(7, 0.28 * c * k + 2)), 3.8))
        width = 0.8 / k
        x = np.arange(c)
        for i, r in enumerate(rows):
            values = [100 * v if _isnum(v) else 0.0 for v in r["IoU"]]
            ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=r["run_id"], color=colors[r["run_id"]])
        ax.set_xticks(x, names, rotation=45 if c > 8 else 0, ha="right" if c > 8 else "center")
        ax.set_ylabel("IoU (%)")
        top = max([100 * v for r in rows for v in r["IoU"] if _isnum(v)] + [1.0])
        ax.set_ylim(0, min(100, top * 1.15 + 2))
        ax.grid(axis="y", color="#e3e7ec")
        ax.set_axisbelow(True)
        ax.legend(title="run", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        parts.append(f"<img class='chart' alt='IoU per class and run' src='{_figure_uri(plt, fig)}'>")
    head = "<th>Class</th>" + "".join(f"<th>{_swatch(colors[r['run_id']])}{_esc(r['run_id'])}</th>" for r in rows)
    body = []
    for j, name in enumerate(names):
        values = [r["IoU"][j] if j < len(r["IoU"]) else None for r in rows]
        nums = [v for v in values if _isnum(v)]
        top_v = max(nums) if nums and len(rows) > 1 else None
        cells = "".join(f"<td{' class=best' if _isnum(v) and v == top_v else ''}>{_fmt('IoU', v)}</td>" for v in values)
        body.append(f"<tr><td class='text'>{_esc(name)}</td>{cells}</tr>")
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    parts.append(
        "<p class='caption'>IoU (%) per class: the dataset's summed intersections over summed unions. – : the class is in neither labels nor predictions.</p></section>"
    )
    return "\n".join(parts)


def _section_pairs(result: Comparison, plt) -> str:
    pairs = list(iter_pairs(result))
    parts = ["<section id='pairs'><h2>Differences between runs</h2>"]
    if not pairs:
        why = "one run only" if len(result.runs) < 2 else "no labeled image in common"
        parts.append(f"<p class='note'>No pairwise differences: {why}.</p></section>")
        return "\n".join(parts)
    parts.append(f"<img class='chart' alt='forest plot of the differences between runs' src='{_forest_plot(pairs, plt)}'>")
    parts.append(
        "<ul class='legend'><li>" + _swatch("#1a7f37") + "A better: the interval excludes 0</li><li>" + _swatch("#c62828")
        + "A worse: the interval excludes 0</li><li>" + _swatch("#6e7781") + "the interval holds 0: no clear difference</li></ul>"
    )  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in ("Pair (A − B)", "Metric", "A", "B", "A − B", "95% interval", "Images"))
    body = []
    for p in pairs:
        m = p["metric"]
        direction = ""
        if excludes_zero(p):
            better = (p["ci_low"] > 0) != (m in LOWER_IS_BETTER)
            direction = " class='up'" if better else " class='down'"
        body.append(
            f"<tr><td class='text'>{_esc(p['run_a'])} − {_esc(p['run_b'])}</td><td class='text'>{_esc(m)}{_unit(m)}</td>"
            f"<td>{_fmt(m, p['value_a'])}</td><td>{_fmt(m, p['value_b'])}</td><td{direction}>{_fmt_diff(m, p['difference'])}</td>"
            f"<td>[{_fmt_diff(m, p['ci_low'])}, {_fmt_diff(m, p['ci_high'])}]</td><td>{p['images']}</td></tr>"
        )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    parts.append(
        "<p class='caption'>A − B over the images both runs labeled; mIoU, mDice and aAcc in percentage points. The interval: "
        f"{result.resamples} resamples of the images with replacement (the same images for both runs), the dataset metric "
        "recomputed from the summed areas of each resample, the 2.5th and 97.5th percentile of A − B. An interval that excludes "
        "0 is coloured (green: A better; for MAE lower is better). pairs.parquet holds both orders of each pair.</p></section>"
    )
    return "\n".join(parts)


def _forest_plot(pairs: list[dict], plt) -> str:
    """Each pair's difference with its interval, one panel per metric: the chart's data URI."""
    metrics = list(dict.fromkeys(p["metric"] for p in pairs))
    labels = list(dict.fromkeys(f"{p['run_a']} − {p['run_b']}" for p in pairs))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8.5, sum(0.5 + 0.42 * len(labels) for _ in metrics) + 0.6), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        rows = [p for p in pairs if p["metric"] == metric]
        scale = 1.0 if metric in COD_KEYS else 100.0
        for y, p in enumerate(rows):
            if not all(_isnum(p[k]) for k in ("difference", "ci_low", "ci_high")):
                continue
            d, lo, hi = (scale * p[k] for k in ("difference", "ci_low", "ci_high"))
            color = "#6e7781"  # the interval holds 0
            if excludes_zero(p):
                color = "#1a7f37" if (p["ci_low"] > 0) != (metric in LOWER_IS_BETTER) else "#c62828"
            ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=4, markersize=6, lw=2)
        ax.axvline(0, color="#1d232b", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)), [f"{p['run_a']} − {p['run_b']}" for p in rows])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"{metric}{_unit(metric)}", loc="left", fontsize=10, fontweight="bold")
        ax.grid(axis="x", color="#e3e7ec")
        ax.set_axisbelow(True)
        lo_all = [scale * p["ci_low"] for p in rows if _isnum(p["ci_low"])] + [0.0]
        hi_all = [scale * p["ci_high"] for p in rows if _isnum(p["ci_high"])] + [0.0]
        span = max(max(hi_all) - min(lo_all), 1e-3 * scale)
        ax.set_xlim(min(lo_all) - 0.12 * span, max(hi_all) + 0.12 * span)
    axes[-1, 0].set_xlabel("difference A − B with its 95% interval")
    fig.tight_layout()
    return _figure_uri(plt, fig)


def _section_confusion(result: Comparison, plt) -> str:
    mp = result.mask_pass
    parts = ["<section id='confusion'><h2>Confusion matrices</h2>"]
    if mp.confusion is None or not mp.confusion_images:
        why = "; ".join(result.sources.notes) or "no label could be paired with the compared images"
        parts.append(f"<p class='note'>No confusion matrices: {_esc(why)}.</p></section>")
        return "\n".join(parts)
    names = result.runs[0].class_names
    c, k = len(names), len(result.runs)
    cols = min(k, 3)
    rows_n = math.ceil(k / cols)
    side = min(6.0, max(3.4, 0.32 * c + 2.2))
    fig, axes = plt.subplots(rows_n, cols, figsize=(side * cols + 1.0, side * rows_n), squeeze=False, layout="constrained")
    image = None
    for idx, ax in enumerate(axes.ravel()):
        if idx >= k:
            ax.axis("off")
            continue
        counts = mp.confusion[idx].astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(result.runs[idx].label, fontsize=10, fontweight="bold")
        ax.set_xticks(range(c), names, rotation=45 if c > 4 else 0, ha="right" if c > 4 else "center", fontsize=8 if c > 12 else 9)
        ax.set_yticks(range(c), names, fontsize=8 if c > 12 else 9)
        ax.set_xlabel("predicted")
        if idx % cols == 0:
            ax.set_ylabel("label")
        ax.spines[:].set_visible(False)
        if c <= 12:
            for i in range(c):
                for j in range(c):
                    if not np.isnan(share[i, j]):
                        ax.text(j, i, f"{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.55 else "#1d232b")  # fmt: skip
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        bar.set_label("share of the label's pixels")
    parts.append(f"<img class='chart' alt='confusion matrices' src='{_figure_uri(plt, fig)}'>")
    parts.append(
        f"<p class='caption'>Pixels of {mp.confusion_images} labeled images, labels read from "
        f"<code>{_esc(result.sources.labels and next(iter(result.sources.labels.values())).rsplit('/', 1)[0])}</code> "
        "(the image's relative key, any label extension, .png preferred). Each row is a label class: the share of its pixels "
        "predicted as each class (rows sum to 100%); ignore_index pixels count nowhere.</p></section>"
    )
    return "\n".join(parts)


def _section_speed(result: Comparison, colors: dict[str, str], plt) -> str:
    rows = [r for r in result.comparison.to_pylist() if _isnum(r["images_per_second"]) and _isnum(r["mIoU"])]
    parts = ["<section id='speed-accuracy'><h2>Speed against accuracy</h2>"]
    if not rows:
        parts.append("<p class='note'>No run has both a speed and an mIoU.</p></section>")
        return "\n".join(parts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        ax.scatter([r["images_per_second"]], [100 * r["mIoU"]], s=90, color=colors[r["run_id"]], zorder=3, edgecolor="white")
        ax.annotate(r["run_id"], (r["images_per_second"], 100 * r["mIoU"]), textcoords="offset points", xytext=(8, 6), fontsize=9)
    xs = [r["images_per_second"] for r in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ys = [100 * r["mIoU"] for r in rows]
    pad_y = max(2.0, 0.2 * (max(ys) - min(ys)))
    ax.set_ylim(max(0, min(ys) - pad_y), min(100, max(ys) + pad_y))
    pad_x = max(0.05, 0.25 * (max(xs) - min(xs)))
    if ax.get_xscale() == "linear":
        ax.set_xlim(max(0, min(xs) - pad_x), max(xs) + pad_x)
    ax.set_xlabel("images per second (all attempts)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(color="#e3e7ec")
    ax.set_axisbelow(True)
    parts.append(f"<img class='chart' alt='images per second against mIoU' src='{_figure_uri(plt, fig)}'>")
    parts.append(
        "<p class='caption'>Up and to the right is better. Speed is each run's own throughput (summary.json), so it depends "
        "on the machine and settings of that run (batch size, actors, GPUs).</p></section>"
    )
    return "\n".join(parts)


def _thumb(array: np.ndarray, target: int = THUMB) -> np.ndarray:
    """`array` (H x W or H x W x 3) with its longer side brought near `target`: strided sampling when
    large, whole-pixel blocks when small (nearest, so that masks stay crisp)."""
    h, w = array.shape[:2]
    step = max(1, max(h, w) // target)
    array = array[::step, ::step]
    h, w = array.shape[:2]
    grow = max(1, target // max(h, w, 1))
    return np.repeat(np.repeat(array, grow, axis=0), grow, axis=1) if grow > 1 else array


def _colour(mask: np.ndarray, palette: np.ndarray, photo: np.ndarray | None, ignore: np.ndarray | None = None) -> np.ndarray:
    colours = palette[np.clip(mask.astype(np.int64), 0, len(palette) - 1)]
    if photo is not None:
        out = (0.35 * photo.astype(np.float32) + 0.65 * colours.astype(np.float32)).astype(np.uint8)
    else:
        out = colours
    if ignore is not None and ignore.any():
        base = photo if photo is not None else np.full_like(out, 255)
        out[ignore] = (0.6 * base[ignore].astype(np.float32) + 0.4 * 128).astype(np.uint8)
    return out


def _section_disagreements(result: Comparison, storage_options: dict) -> str:
    mp = result.mask_pass
    parts = ["<section id='disagreements'><h2>Where the runs disagree most</h2>"]
    if len(result.runs) < 2 or not mp.top:
        parts.append("<p class='note'>Needs two runs or more with masks of the same images.</p></section>")
        return "\n".join(parts)
    names = result.runs[0].class_names
    palette = class_palette(max(len(names), 1))
    legend = "".join(f"<li>{_swatch(_hex(palette[i]))}{_esc(n)}</li>" for i, n in enumerate(names))
    sure = [r.label for r, has in zip(result.runs, mp.with_confidence) if has]
    if sure:
        legend += (
            f"<li>{_swatch('#ff00ff')}runs differ, {_esc(', '.join(sure))} {'all ' if len(sure) > 1 else ''}sure "
            f"(at least {100 * CONFIDENT:.0f}%)</li><li>{_swatch(_hex(_shade(0.0)))}runs differ, one of them hesitates</li>"
        )
    else:
        legend += f"<li>{_swatch('#ff00ff')}runs differ</li>"
    parts.append(f"<ul class='legend'>{legend}</ul>")
    top_ids = {i for _, i in mp.top}
    scores = {
        (r["run_id"], r["image_id"]): r["mIoU"]
        for r in result.per_image.select(["run_id", "image_id", "mIoU"]).to_pylist()
        if r["image_id"] in top_ids
    }
    missing_photo = False
    for fraction, image_id in mp.top:
        case, with_photo = _disagreement_case(result, image_id, fraction, palette, scores, storage_options)
        parts.append(case)
        missing_photo |= not with_photo
    explain = (
        f"The {len(mp.top)} images (of {len(mp.disagreement)}) with the largest fraction of pixels on which the runs' masks are not "
        "all the same; per_image.parquet has the fraction of every image (column disagreement)."
    )
    if sure:
        explain += (
            f" Runs with a confidence map (output.confidence: {_esc(', '.join(sure))}) shade where the runs differ by the least "
            f"sure of them: magenta where {'each' if len(sure) > 1 else 'it'} gave its class at least {100 * CONFIDENT:.0f}% "
            "(a confident disagreement: one model is sure and wrong, or both are), paler as it hesitates. Each such run's "
            "caption gives its confident disagreement: the share of the image's pixels where the runs differ and it is that "
            "sure (per_image.parquet: confident_disagreement, and disagreement_confidence, its mean confidence there)."
        )
    if missing_photo:
        explain += " Where the image could not be read (or the input is not an image folder) the masks are drawn without it."
    parts.append(f"<p class='caption'>{explain}</p></section>")
    return "\n".join(parts)


def _disagreement_case(
    result: Comparison, image_id: str, fraction: float, palette: np.ndarray, scores: dict[tuple[str, str], Any], storage_options: dict
) -> tuple[str, bool]:
    """One image's strip (its photo, its label, each run's mask, where the runs differ) as a <figure>,
    and whether its photo is in it."""
    masks = [r.store.mask_of(image_id) for r in result.runs]
    with_confidence = result.mask_pass.with_confidence or [False] * len(result.runs)
    confidences = [r.store.mask_of(image_id, "confidence") if has else None for r, has in zip(result.runs, with_confidence)]
    measures = result.mask_pass.confidence.get(image_id) or [None] * len(result.runs)
    shape = masks[0].shape
    photo = _case_photo(result.sources, image_id, shape, storage_options)
    label, label_ignore = _case_label(result.sources, image_id, shape, len(palette), storage_options)
    tiles_n = (photo is not None) + (label is not None) + len(masks) + 1
    target = max(120, min(THUMB, (1150 - 12 * (tiles_n - 1)) // tiles_n))
    photo_t = _thumb(photo, target) if photo is not None else None
    tiles = []
    if photo_t is not None:
        tiles.append(("image", _png_uri(photo_t), "photo"))
    if label is not None:
        lab = _thumb(label, target)
        ignore = (lab < 0) | (lab >= len(palette)) | ((lab == label_ignore) if label_ignore is not None else False)
        tiles.append(("label", _png_uri(_colour(np.where(ignore, 0, lab), palette, photo_t, ignore)), "overlay label"))
    for run, mask, measure in zip(result.runs, masks, measures):
        m = _thumb(mask, target)
        score = scores.get((run.label, image_id))
        caption = f"{run.label}" + (f" · mIoU {100 * score:.1f}%" if _isnum(score) else "")
        if measure is not None:
            caption += f" · confident disagreement {100 * measure.confident:.1f}%"
        tiles.append((caption, _png_uri(_colour(m, palette, photo_t)), "overlay mask"))
    tiles.append(("runs differ", _png_uri(_difference(masks, photo_t, target, confidences)), "overlay difference"))
    strip = "".join(
        f"<figure><img class='{cls}' alt='{_esc(cap)}' src='{uri}'><figcaption>{_esc(cap)}</figcaption></figure>" for cap, uri, cls in tiles
    )
    case = (
        f"<figure class='case'><div class='strip'>{strip}</div><figcaption><strong>{_esc(image_id)}</strong> "
        f"({shape[1]} × {shape[0]}): the runs disagree on {100 * fraction:.1f}% of its pixels</figcaption></figure>"
    )
    return case, photo is not None


def _case_photo(src: Sources, image_id: str, shape: tuple[int, ...], storage_options: dict) -> np.ndarray | None:
    """The image's photo where it can be read and fits its masks; None: the masks are drawn alone."""
    try:
        photo = read_photo(src, image_id, storage_options)
    except Exception:  # a photo that cannot be read: the masks alone
        return None
    return photo if photo is not None and photo.shape[:2] == shape else None


def _case_label(
    src: Sources, image_id: str, shape: tuple[int, ...], num_classes: int, storage_options: dict
) -> tuple[np.ndarray | None, int | None]:
    """The image's label as a class map (and its value that counts nowhere), where it can be read, fits
    its masks and the run's reading reads it; (None, None) otherwise."""
    try:
        label = read_label(src, image_id, storage_options)
    except Exception:
        return None, None
    if label is None or label.shape != shape:
        return None, None
    try:
        return label_classes(src, label, num_classes)
    except LabelReadingError:
        return None, None


def _shade(sure: np.ndarray | float) -> np.ndarray:
    """The colour of a disagreeing pixel by how sure the least sure run was (0: hesitates, CONFIDENT
    and above: sure): from pale pink to magenta."""
    t = np.clip(np.asarray(sure, np.float32), 0.0, 1.0)[..., None]
    pale, full = np.array([250, 200, 250], np.float32), np.array([255, 0, 255], np.float32)
    return (pale + t * (full - pale)).astype(np.uint8)


def _difference(
    masks: list[np.ndarray], photo: np.ndarray | None, target: int, confidences: list[np.ndarray | None] | None = None
) -> np.ndarray:
    """The pixels where the runs' masks are not all the same, in magenta over the greyed photo; with
    confidence maps (uint8 round(255 p)), shaded by the least sure of the runs that have one: magenta
    where it is at least CONFIDENT sure, paler down to 1 / classes."""
    differ, _ = disagreement(masks, [None] * len(masks))
    d = _thumb(differ, target)
    base = (photo.mean(axis=2) if photo is not None else np.full(d.shape, 200.0)) * 0.5 + 60
    diff_img = np.repeat(base[:, :, None], 3, axis=2).astype(np.uint8)
    maps = [c for c in confidences or [] if c is not None]
    if not maps:
        diff_img[d] = (255, 0, 255)
        return diff_img
    least = _thumb(np.minimum.reduce(maps), target)[d].astype(np.float32) / 255
    diff_img[d] = _shade(np.minimum(least / CONFIDENT, 1.0) ** 2)
    return diff_img


def _section_method(result: Comparison) -> str:
    files = "".join(f"<li><code>{_esc(uri)}</code></li>" for name, uri in result.files.items())
    binary = (
        " Binary measures (Sm, Em_mean, wFm, MAE) are means over images: each resample weighs the per-image values "
        "by how often the image was drawn (Em_mean: the mean of each image's E-measure curve)."
        if result.binary
        else ""
    )
    return (
        "<section id='method'><h2>How these numbers were made</h2>"
        "<p>Runs are joined on <code>image_id</code>. Metrics follow mmsegmentation: per-class IoU is the dataset's summed "
        "intersections over its summed unions, a class absent from labels and predictions is left out of the means. "
        f"Each interval is a paired bootstrap: {result.resamples} resamples of the {result.labeled} labeled images with "
        f"replacement (seed {result.seed}), the same images for every run; each resample's metric is recomputed from the "
        f"resample's summed areas (a resample matrix times the per-image area matrix).{binary}</p>"
        f"<p>Files written:</p><ul>{files}<li><code>report.html</code> (this page)</li></ul></section>"
    )


def _section_receptive_field(result: Comparison) -> str:
    parts = [
        "<section id='receptive-field'><h2>Effective receptive fields</h2>",
        "<p class='lead'>Where each model looks: the gradient of the centre output pixel's score with respect to the input "
        "(Luo et al. 2016), averaged over the same sample of these images. The theoretical field of an attention model is the "
        "whole input; the effective one is where the mass actually sits.</p>",
        "<table><tr><th class='text'>Run</th><th>images</th><th>crop</th><th>theoretical</th><th>50% within</th><th>90% within</th></tr>",
    ]
    for erf in result.receptive_fields:
        r = erf["result"]
        theoretical = f"{r.theoretical} px" if r.theoretical else "whole input"
        parts.append(
            f"<tr><td class='text'>{_esc(erf['label'])}</td><td>{r.images}</td><td>{r.size} px</td><td>{theoretical}</td>"
            f"<td>{r.effective_radius(0.5)} px</td><td>{r.effective_radius(0.9)} px</td></tr>"
        )
    parts.append("</table><div class='figures'>")
    for erf in result.receptive_fields:
        parts.append(f"<figure><img src='{erf['figure']}' alt='receptive field of {_esc(erf['label'])}'></figure>")
    parts.append("</div></section>")
    return "".join(parts)
