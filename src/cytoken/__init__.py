"""cytoken: cell-level digital pathology on any machine."""

__version__ = "0.1.0"

