"""Compatibility re-exports: the local S3 servers and proxy live in `testbed.s3` (shared
with bench/). Import from there; this module goes once no branch imports it."""

from testbed.s3.endpoint import S3Endpoint, free_port, unique_bucket_name
from testbed.s3.faults import Fault, FaultHook, FaultSchedule
from testbed.s3.moto_server import MotoS3Server
from testbed.s3.operations import (
    LIST_OPERATIONS,
    LoggedRequest,
    RequestInfo,
    b2_rejected_header,
    s3_error_xml,
    s3_operation,
)
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server

__all__ = [
    "LIST_OPERATIONS",
    "Fault",
    "FaultHook",
    "FaultSchedule",
    "LoggedRequest",
    "MotoS3Server",
    "RcloneS3Server",
    "RequestInfo",
    "S3Endpoint",
    "S3Proxy",
    "b2_rejected_header",
    "free_port",
    "s3_error_xml",
    "s3_operation",
    "unique_bucket_name",
]
