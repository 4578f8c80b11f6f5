"""Side-by-side benchmarks of runc-sandboxer (1:N) against containerd's stock runc shim path (1:1).

Entry point: ``benchmarks/run.py`` (``make bench`` / ``make bench-smoke``).
"""
