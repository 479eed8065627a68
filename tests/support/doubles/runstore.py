"""The in-memory `RunStore` lives in `testbed/` (shared with `bench/`); tests import it here."""

from testbed.doubles.runstore import InMemoryRunStore

__all__ = ["InMemoryRunStore"]
