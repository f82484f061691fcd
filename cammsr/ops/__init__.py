"""cammsr.ops."""
