"""What a comparison gives (`Comparison`: the runs, the three tables, the mask pass, the notes), and
its pairs read in the order the runs were given."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.analysis.compare.masks import MaskPass
from pipeline.analysis.compare.runs import Run
from pipeline.analysis.compare.sources import Sources


@dataclass
class Comparison:
    runs: list[Run]
    out_uri: str
    images: int  # images compared (every run segmented them)
    labeled: int  # of those, labeled in every run
    intersect: bool
    resamples: int
    seed: int
    comparison: pa.Table
    pairs: pa.Table
    per_image: pa.Table
    notes: list[str]
    mask_pass: MaskPass
    sources: Sources
    binary: bool
    files: dict[str, str] = field(default_factory=dict)
    receptive_fields: list[dict] = field(default_factory=list)  # per run: label, ErfResult, figure


def iter_pairs(result: Comparison) -> Iterator[dict]:
    """pairs.parquet's rows with run_a given before run_b (the other order is the same pair negated)."""
    order = {r.label: i for i, r in enumerate(result.runs)}
    for p in result.pairs.to_pylist():
        if order[p["run_a"]] < order[p["run_b"]]:
            yield p


def excludes_zero(p: dict) -> bool:
    """Whether a pair's 95% interval excludes 0: a clear difference."""
    return p["ci_low"] is not None and p["ci_high"] is not None and (p["ci_low"] > 0 or p["ci_high"] < 0)
