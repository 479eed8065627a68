"""backrest-relay local agent."""

__version__ = "0.1.0"
