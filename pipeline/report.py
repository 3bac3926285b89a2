"""The summary table printed at the end of a run."""

from __future__ import annotations

import math


def _pct(v: float) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def _cod(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cod_line(s: dict) -> str:
    """A binary task's camouflaged-object measures (pipeline.cod_metrics) on one line."""
    return (
        f"Sm {_cod(s['Sm'])}   Em {_cod(s.get('Em_mean'))} (max {_cod(s.get('Em_max'))}, adp {_cod(s.get('Em_adp'))})"
        f"   wFm {_cod(s.get('wFm'))}   Fm {_cod(s.get('Fm_mean'))} (max {_cod(s.get('Fm_max'))}, adp {_cod(s.get('Fm_adp'))})"
        f"   MAE {_cod(s.get('MAE'))}"
    )


def _label_lines(s: dict, num_classes: int) -> list[str]:
    """What the labels held beyond the classes, and how a binary task's labels were read."""
    lines = []
    readings = s.get("label_readings")
    if readings and any(readings.values()):
        described = {"mask": "0/255 masks (foreground > 128)", "class_index": "class indices", "empty": "background only"}
        lines.append("labels read as " + ", ".join(f"{described[k]}: {n}" for k, n in readings.items() if n))
    outside = s.get("label_values_outside_classes") or {}
    if outside.get("pixels"):
        lines.append(
            f"labels: {outside['pixels']} pixels in {outside['images']} images hold values outside the model's {num_classes} classes "
            "(and not ignore_index): counted in no class"
        )
    if outside.get("unknown_images"):
        lines.append(f"labels: {outside['unknown_images']} images were measured before label values outside the classes were counted")
    return lines


def format_summary(summary: dict, run_dir: str = "") -> str:
    names = summary.get("class_names") or [str(i) for i in range(len(summary.get("IoU", [])))]
    width = max([len("class")] + [len(n) for n in names])
    lines = []
    if summary.get("labeled_images"):
        lines.append(f"{'class':<{width}}    IoU    Acc   Dice")
        for name, iou, acc, dice in zip(names, summary["IoU"], summary["Acc"], summary["Dice"]):
            lines.append(f"{name:<{width}} {_pct(iou)} {_pct(acc)} {_pct(dice)}")
        lines.append(f"{'mean':<{width}} {_pct(summary['mIoU'])} {_pct(summary['mAcc'])} {_pct(summary['mDice'])}")
        lines.append(
            f"aAcc {_pct(summary['aAcc']).strip()}   mIoU {_pct(summary['mIoU']).strip()}   mAcc {_pct(summary['mAcc']).strip()}   mDice {_pct(summary['mDice']).strip()}"
        )
    if "Sm" in summary:
        lines.append(_cod_line(summary))
    lines.extend(_label_lines(summary, len(names)))
    counts = f"images {summary.get('images', 0)}   errors {summary.get('errors', 0)}   labeled {summary.get('labeled_images', 0)}"
    now = summary.get("this_attempt") or summary.get("throughput")
    if now:
        rate = now.get("images_per_second") or 0.0
        counts += f"   this attempt: {now.get('images', 0)} images, {rate:.2f} images/s over {now.get('seconds', 0.0):.1f} s"
    lines.append(counts)
    if run_dir:
        lines.append(f"run: {run_dir}")
    return "\n".join(lines)
