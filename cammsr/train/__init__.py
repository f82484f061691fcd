"""cammsr.train.trainer."""
