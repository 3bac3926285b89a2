"""After a run: compare runs (and the receptive fields it draws), export a run's results. A new export
belongs here."""
