"""The package version (read by the build backend and by ``stalk --version``)."""

#: The version of this stalk package (also printed by ``stalk --version``).
__version__ = "0.1.0"
