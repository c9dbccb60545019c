"""pytest-benchmark suite (`make bench-suite`): every provider and mode at small sizes."""
