"""The adversarial catalogue: one named hostile-input case per row (see README.md here)."""
