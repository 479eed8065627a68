"""`rclone serve s3` over a plain directory: an independent S3 implementation whose
"remote" files tests can look at and damage directly."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from testbed.s3.endpoint import LOCALHOST, S3Endpoint, Served, free_port, wait_until_answering


class RcloneS3Server(Served):
    """``rclone serve s3`` over a local directory, as a context manager.

    Each top-level directory of ``root`` is a bucket. rclone reads no config file
    (``--config ""``) and caches nothing (``--vfs-cache-mode off``, private
    ``--cache-dir``), so a developer's own rclone setup cannot leak in.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        access_key: str = "relay-test-access",
        secret_key: str = "relay-test-secret-key",  # noqa: S107 - a local test server
        rclone: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls` (certificate, key; testbed.tls makes a pair) serves https instead of http."""
        if len(access_key) < 8 or len(secret_key) < 8:
            raise ValueError("rclone serve s3 wants access and secret keys of 8+ characters")
        self._requested_root = root
        self._access_key = access_key
        self._secret_key = secret_key
        self._rclone = rclone
        self._extra_args = tuple(extra_args)
        if tls is not None:
            self._extra_args += ("--cert", str(tls[0]), "--key", str(tls[1]))
        self._tls = None if tls is None else ssl.create_default_context(cafile=str(tls[0]))
        self._startup_timeout = startup_timeout
        self._workdir: Path | None = None
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoint: S3Endpoint | None = None

    @property
    def root(self) -> Path:
        """The served directory; bucket ``b`` lives in ``root / b``."""
        if self._root is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._root

    @property
    def endpoint(self) -> S3Endpoint:
        """URL and keys of the running server."""
        if self._endpoint is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._endpoint

    @property
    def pid(self) -> int:
        """Process id of the rclone child (for tests that kill or stop it)."""
        if self._proc is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._proc.pid

    def bucket_path(self, bucket: str) -> Path:
        """Directory holding ``bucket``'s objects."""
        return self.root / bucket

    def log_text(self) -> str:
        """rclone's stderr so far (startup notices, errors)."""
        if self._workdir is None:
            return ""
        log = self._workdir / "rclone.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def start(self) -> None:
        """Start rclone and wait until it answers HTTP (retrying if the port was taken)."""
        if self._proc is not None:
            raise RuntimeError("RcloneS3Server already running")
        rclone = self._rclone or shutil.which("rclone")
        if rclone is None:
            raise RuntimeError("rclone not found on PATH")
        self._workdir = Path(tempfile.mkdtemp(prefix="rclone-serve-s3-"))
        self._root = self._requested_root or self._workdir / "root"
        self._root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        for _attempt in range(3):
            port = free_port()
            cmd = [
                rclone,
                "serve",
                "s3",
                "--config",
                "",
                "--cache-dir",
                str(self._workdir / "cache"),
                "--addr",
                f"{LOCALHOST}:{port}",
                "--auth-key",
                f"{self._access_key},{self._secret_key}",
                "--vfs-cache-mode",
                "off",
                *self._extra_args,
                str(self._root),
            ]
            with (self._workdir / "rclone.log").open("wb") as log:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env
                )
            try:
                wait_until_answering(
                    port,
                    self._startup_timeout,
                    self._startup_failure,
                    "rclone serve s3",
                    tls=self._tls,
                )
            except RuntimeError as exc:
                self._terminate()
                log_text = self.log_text()
                if "address already in use" in log_text:
                    continue
                self._cleanup_dirs()
                raise RuntimeError(f"{exc}\n--- rclone log ---\n{log_text}") from None
            self._endpoint = S3Endpoint(
                endpoint_url=f"{'https' if self._tls else 'http'}://{LOCALHOST}:{port}",
                access_key=self._access_key,
                secret_key=self._secret_key,
                local_root=self._root,
            )
            return
        self._cleanup_dirs()
        raise RuntimeError("rclone serve s3 could not bind a free port in 3 attempts")

    def _startup_failure(self) -> str | None:
        """Why rclone is gone (its exit code), or None while it runs."""
        if self._proc is None:
            return "not started"
        code = self._proc.poll()
        return None if code is None else f"exit code {code}"

    def stop(self) -> None:
        """Stop rclone (terminate, then kill) and remove its private directories."""
        self._terminate()
        self._endpoint = None
        self._cleanup_dirs()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _cleanup_dirs(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._root = None
