"""cammsr.data."""
