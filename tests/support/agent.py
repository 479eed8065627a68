"""Compatibility re-export: this lives in `testbed.agent` (shared with bench/). Import from
there; this module goes once no branch imports it."""

from testbed.agent import *  # noqa: F403
from testbed.agent import ROOT as ROOT
