"""cammsr.ingest.stage."""
