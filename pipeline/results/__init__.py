"""Where a result lands: the run directory's tables and schemas, the mask codec, the sink that writes the
parts, the run store that commits and reads them, and the summary table printed at the end of a run."""
