"""Where a pixel gets its class: the job's model, the actor that runs it (predictor), tiling and the
streaming stitcher, and the object tasks' windows and post-processing."""
