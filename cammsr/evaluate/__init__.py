"""cammsr.evaluate.stage."""
