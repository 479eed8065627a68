"""Compatibility re-exports: the local S3 servers and proxy live in `testbed.s3` (shared
with bench/). Import from there; this module goes once no branch imports it."""

from testbed.s3.endpoint import *  # noqa: F403
from testbed.s3.faults import *  # noqa: F403
from testbed.s3.moto_server import *  # noqa: F403
from testbed.s3.operations import *  # noqa: F403
from testbed.s3.proxy import *  # noqa: F403
from testbed.s3.rclone import *  # noqa: F403
