"""seg-fast: an Exchange ActiveSync secure email gateway."""

__version__ = "0.1.0"
