"""segpipe's job: source -> decode -> predict (tiling, model, stitching) -> encode -> sink.

The Ray Data plan that wires the stages is in `pipeline.plan`; each stage is a small module.
"""
