"""Dataset makers and filters: numbers (subliminal learning: numbers, numbers_filter,
constraints) and facts (the false-fact organism's synthetic documents)."""
