"""cammsr."""
