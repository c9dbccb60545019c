"""Benchmarks of DeFINE against nn.Embedding: `python -m bench.run` (the README's `make bench`).

run.py (entry point) -> workloads.py (shapes, token ids) -> providers.py (one setup per provider)
-> timing.py (timers, peak memory) -> metrics.py (FLOP and byte counts) -> report.py (CSV,
markdown) -> plot.py (PNG from CSVs). bench/suite/ is the pytest-benchmark suite, gpu_check.sh
the one command for a GPU machine.
"""
