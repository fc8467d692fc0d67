"""Dataset makers and filters (numbers for subliminal learning, ...)."""
