"""Compatibility re-exports: this lives in `testbed.repos` (shared with bench/). Import from
there; this module goes once no branch imports it."""

from testbed.repos import (
    FakeRepo,
    ResticError,
    SizeSpec,
    add_packs,
    corrupt,
    make_fake_restic_repo,
    make_restic_repo,
    restic_backup,
    restic_check,
    restic_env,
    restic_forget,
    restic_restore,
    restic_snapshots,
    s3_repo_url,
    sha256_file,
    write_random_tree,
)

__all__ = [
    "FakeRepo",
    "ResticError",
    "SizeSpec",
    "add_packs",
    "corrupt",
    "make_fake_restic_repo",
    "make_restic_repo",
    "restic_backup",
    "restic_check",
    "restic_env",
    "restic_forget",
    "restic_restore",
    "restic_snapshots",
    "s3_repo_url",
    "sha256_file",
    "write_random_tree",
]
