"""After a run: compare runs (the compare/ package, and the receptive fields its report draws), export a
run's results. A new export belongs here."""
