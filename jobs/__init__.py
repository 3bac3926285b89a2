"""Entry points: the `segpipe` command line and what `ray job submit` runs."""
