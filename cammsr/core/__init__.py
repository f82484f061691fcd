"""cammsr.core."""
