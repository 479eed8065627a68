"""The in-memory `FanoutStore` lives in `testbed/` (shared with `bench/`); tests import it here."""

from testbed.doubles.fanout import InMemoryFanoutStore

__all__ = ["InMemoryFanoutStore"]
