"""Mirroring a restic repository to S3: scan, plan, upload, state."""
