"""stalk's benchmarks: ``python -m benchmarks`` runs ``stalk bench`` (see README.md)."""
