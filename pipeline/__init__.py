"""segpipe's job: source -> decode -> predict (tiling, model, stitching) -> encode -> sink.

A folder per part of the path: `io` (storage, the readers per input format, decode), `predict` (the
job's model, the actor, tiling, the object tasks), `results` (the run directory: tables, mask codec,
sink, run store), `metrics` (what a prediction scores), `analysis` (compare, export: after a run).
The Ray Data plan that wires the stages is `pipeline.plan`; the dry run's estimate `pipeline.estimate`;
config, rows, telemetry, extras and local_ray are shared by all, and redaction (credentials) sits under them.
"""
