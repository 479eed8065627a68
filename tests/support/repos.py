"""Compatibility re-export: this lives in `testbed.repos` (shared with bench/). Import from
there; this module goes once no branch imports it."""

from testbed.repos import *  # noqa: F403
from testbed.repos import __all__ as __all__
