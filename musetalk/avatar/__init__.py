"""Avatar preparation (force_prep) and the on-disk avatar cache."""
