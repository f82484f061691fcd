"""Side-by-side benchmarks that print a table and end with one JSON line (see benchmarks/README.md)."""
