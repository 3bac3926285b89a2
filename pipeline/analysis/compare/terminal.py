"""The short table `segpipe compare` prints: each run's headline metrics, the mIoU differences with
their intervals, the notes and where the report is."""

from __future__ import annotations

import math
from typing import Any

from pipeline.analysis.compare.result import Comparison, excludes_zero, iter_pairs


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def format_comparison(result: Comparison) -> str:
    """The short table `segpipe compare` prints."""
    rows = result.comparison.to_pylist()
    width = max([len("run")] + [len(r["run_id"]) for r in rows])
    mwidth = max([len("model")] + [len(r["model"] or "") for r in rows])
    lines = [f"{'run':<{width}}  {'model':<{mwidth}}  {'images':>7}  {'img/s':>7}  {'aAcc':>6}  {'mIoU':>6}  {'mDice':>6}"]
    for r in rows:
        rate = f"{r['images_per_second']:.2f}" if r["images_per_second"] is not None else "-"
        lines.append(
            f"{r['run_id']:<{width}}  {r['model'] or '':<{mwidth}}  {r['images'] or 0:>7}  {rate:>7}  "
            f"{_pct(r['aAcc']):>6}  {_pct(r['mIoU']):>6}  {_pct(r['mDice']):>6}"
        )
    pairs = [p for p in iter_pairs(result) if p["metric"] == "mIoU"]
    if pairs:
        lines.append(f"mIoU A - B, 95% paired bootstrap over {result.labeled} images ({result.resamples} resamples), points:")
        for p in pairs:
            lines.append(
                f"  {p['run_a']} - {p['run_b']}: {_signed(p['difference'])} [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}]"
                + (" *" if excludes_zero(p) else "")
            )
    for note in result.notes:
        lines.append(f"note: {note}")
    lines.append(f"report: {result.files.get('report.html', '')}")
    return "\n".join(lines)


def _signed(v: Any, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if v is None else f"{scale * v:+.{digits}f}"
