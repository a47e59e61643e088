"""portpool's benchmarks: each ``bench_*.py`` measures against the physical floor and peers."""
