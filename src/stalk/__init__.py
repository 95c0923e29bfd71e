"""stalk: peer-to-peer, end-to-end encrypted, message-based connections over TCP."""

from stalk._version import __version__

__all__ = ["__version__"]
