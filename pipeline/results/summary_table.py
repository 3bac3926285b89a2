"""The summary table printed at the end of a run."""

from __future__ import annotations

import math


def _pct(v: float) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def _cod(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cod_line(s: dict) -> str:
    """A binary task's camouflaged-object measures (pipeline.metrics.cod) on one line."""
    return (
        f"Sm {_cod(s['Sm'])}   Em {_cod(s.get('Em_mean'))} (max {_cod(s.get('Em_max'))}, adp {_cod(s.get('Em_adp'))})"
        f"   wFm {_cod(s.get('wFm'))}   Fm {_cod(s.get('Fm_mean'))} (max {_cod(s.get('Fm_max'))}, adp {_cod(s.get('Fm_adp'))})"
        f"   MAE {_cod(s.get('MAE'))}"
    )


def _mask_ap_line(ap: dict) -> str:
    """An instance task's mask AP (summary.json `mask_ap`, COCOeval's stats) in points, as detectron2 prints it."""
    values = "   ".join(f"{key} {_pct(ap.get(key)).strip()}" for key in ("AP50", "AP75", "APs", "APm", "APl"))
    return f"mask AP {_pct(ap.get('AP')).strip()}   {values}   ({ap.get('images', 0)} images)"


def _track_ap_lines(ap: dict) -> list[str]:
    """A clip model's track AP against YouTube-VIS labels (summary.json `video.mask_ap`), and what did not match."""
    values = "   ".join(f"{key} {_pct(ap.get(key)).strip()}" for key in ("AP50", "AP75", "AR1", "AR10"))
    lines = [f"track mask AP {_pct(ap.get('AP')).strip()}   {values}   ({ap.get('videos', 0)} videos)"]
    if ap.get("note"):
        lines.append(f"labels: {ap['note']}")
    return lines


def _panoptic_line(pq: dict) -> str:
    """A panoptic task's PQ, SQ, RQ (summary.json `panoptic`, panopticapi's), things and stuff apart."""
    return (
        f"PQ {_pct(pq.get('PQ')).strip()}   SQ {_pct(pq.get('SQ')).strip()}   RQ {_pct(pq.get('RQ')).strip()}"
        f"   (things PQ {_pct(pq.get('PQ_th')).strip()}, stuff PQ {_pct(pq.get('PQ_st')).strip()}; {pq.get('panoptic_images', 0)} images)"
    )


def _stability_line(video: dict) -> str:
    """A semantic video run's temporal stability (summary.json `video`, pipeline.results.temporal)."""
    s = video["temporal_stability"]
    line = f"temporal stability: {_pct(s['changed_share']).strip()}% of pixels change label between consecutive frames ({s['pairs']} pairs, {video['videos']} videos)"
    if s.get("labels"):
        ls = s["labels"]
        line += (
            f"; labels {_pct(ls['changed_share']).strip()}%, masks {_pct(ls['masks_changed_share']).strip()}% on their {ls['pairs']} pairs"
        )
    return line


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


AREA_UNIT_NAMES = {"m2": "m²", "um2": "µm²"}


def _area_lines(s: dict) -> list[str]:
    """Raster and slide runs: per class the predicted (and labeled) area in square metres or microns."""
    lines = []
    for unit, shown in AREA_UNIT_NAMES.items():
        section = s.get(f"area_{unit}") or {}
        predicted, labeled = section.get("predicted"), section.get("labeled")
        if not predicted:
            continue
        width = max([len("class")] + [len(n) for n in predicted])
        lines.append(f"{'class':<{width}} {'predicted ' + shown:>18}" + (f" {'labeled ' + shown:>18}" if labeled else ""))
        for name, value in predicted.items():
            lines.append(f"{name:<{width}} {value:18.6g}" + (f" {labeled.get(name, 0.0):18.6g}" if labeled else ""))
        counted = f"{section.get('images', 0)} images" + (f", labels of {section.get('labeled_images', 0)}" if labeled else "")
        lines.append(f"areas in {shown} over {counted} (no-data and skipped pixels in none)")
    return lines


def format_summary(summary: dict, run_dir: str = "") -> str:
    """The terminal's summary: the task's own metrics (per-class IoU and mIoU; the camouflaged-object
    measures of a binary task; mask AP of an instance task, PQ of a panoptic one, when labeled), then counts."""
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
    lines.extend(_area_lines(summary))
    mask_ap, panoptic = summary.get("mask_ap") or {}, summary.get("panoptic") or {}
    if mask_ap:
        lines.append(_mask_ap_line(mask_ap))
    if panoptic:
        lines.append(_panoptic_line(panoptic))
    if (summary.get("video") or {}).get("mask_ap"):
        lines.extend(_track_ap_lines(summary["video"]["mask_ap"]))
    if (summary.get("video") or {}).get("temporal_stability"):
        lines.append(_stability_line(summary["video"]))
    # labeled: the images scored against any labels (class maps, COCO instances, COCO panoptic)
    labeled = max(summary.get("labeled_images") or 0, mask_ap.get("images") or 0, panoptic.get("panoptic_images") or 0)
    counts = f"images {summary.get('images', 0)}   errors {summary.get('errors', 0)}   labeled {labeled}"
    if summary.get("objects"):
        counts += f"   {summary['objects'].get('table', 'objects')} {summary['objects'].get('rows', 0)}"
    now = summary.get("this_attempt") or summary.get("throughput")
    if now:
        rate = now.get("images_per_second") or 0.0
        counts += f"   this attempt: {now.get('images', 0)} images, {rate:.2f} images/s over {now.get('seconds', 0.0):.1f} s"
    lines.append(counts)
    if run_dir:
        lines.append(f"run: {run_dir}")
    return "\n".join(lines)
