"""Build the Lambda deployment package, reproducibly, from uv.lock.

    python3 scripts/lambda_package.py [--uv PATH] [--output dist/lambda.zip]

1. `uv export --frozen --no-dev --extra lambda`: the runtime dependencies plus the
   `lambda` extra, pinned with hashes, exactly as locked (the agent's extras and the dev
   tools are not in it). boto3/botocore stay in: the code needs botocore >= 1.36 checksum
   settings, newer than what some Lambda runtimes bundle.
2. `uv pip install --target` for the Lambda platform (arm64 manylinux, CPython 3.12),
   wheels only, hashes required, no dependency resolution (the export is complete).
3. The `cloud` package from this checkout (never `local_agent`).
4. A zip with sorted entries, fixed timestamps (1980-01-01) and fixed permissions, no
   bytecode caches: the same lock file and sources give the same bytes (given the same
   uv version, which the Makefile pins, and the same zlib).
5. Fails when the package outgrows Lambda's limits: 50 MB zipped for a direct upload,
   250 MB unzipped.

Only the standard library: `make lambda-package` runs it with the system Python.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.12"  # = the template's Runtime (python3.12); tests/infra checks they agree
PLATFORM = "aarch64-manylinux2014"  # = the template's Architectures: [arm64]
PACKAGES = ("cloud",)  # first-party code shipped to Lambda
NATIVE_MARKER = "pydantic_core/_pydantic_core.cpython-312-aarch64-linux-gnu.so"

MAX_ZIPPED = 50 * 1024 * 1024  # direct-upload limit of a .zip deployment package
MAX_UNZIPPED = 250 * 1024 * 1024  # function code + layers, unzipped
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
EXCLUDED_DIRS = frozenset({"__pycache__", "bin"})  # bytecode caches; installers' scripts
EXCLUDED_SUFFIXES = (".pyc", ".pyo")


class PackageError(Exception):
    """The package could not be built or breaks a Lambda limit."""


def run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise PackageError(f"command failed with exit code {result.returncode}: {cmd[0]} {cmd[1]}")


def export_requirements(uv: str, requirements: Path) -> None:
    run(
        [
            uv, "export", "--frozen", "--no-dev", "--extra", "lambda", "--no-emit-project",
            "--format", "requirements.txt", "--output-file", str(requirements), "--quiet",
        ],
        cwd=ROOT,
    )  # fmt: skip


def install_requirements(uv: str, requirements: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    run(
        [
            uv, "pip", "install", "--quiet", "--no-config",
            "--target", str(target),
            "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
            "--only-binary", ":all:", "--no-deps", "--require-hashes", "--link-mode", "copy",
            "--requirements", str(requirements),
        ],
        cwd=ROOT,
    )  # fmt: skip


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(EXCLUDED_SUFFIXES):
                yield Path(dirpath) / name


def collect(site: Path) -> dict[str, Path]:
    """Archive name -> file: the installed dependencies, then our own packages."""
    files: dict[str, Path] = {}
    for path in _walk(site):
        files[path.relative_to(site).as_posix()] = path
    for package in PACKAGES:
        for path in _walk(ROOT / package):
            files[path.relative_to(ROOT).as_posix()] = path
    if "local_agent/__init__.py" in files:
        raise PackageError("local_agent must not be in the Lambda package")
    return files


def _directories(names: list[str]) -> list[str]:
    dirs: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]) + "/")
    return sorted(dirs)


def write_zip(files: dict[str, Path], output: Path) -> int:
    """Write the archive deterministically; returns the unzipped size in bytes.

    Entries (directories included, so every unzip tool recreates the same tree) are in
    sorted order, all dated 1980-01-01 with fixed permissions.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    unzipped = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name in sorted({*files, *_directories(list(files))}):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # unix, so the permission bits below are honoured
            if name.endswith("/"):
                info.external_attr = (0o040755 << 16) | 0x10  # directory
                zf.writestr(info, b"")
                continue
            data = files[name].read_bytes()
            unzipped += len(data)
            info.external_attr = 0o100644 << 16  # Lambda needs world-readable files
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)
    tmp.replace(output)
    return unzipped


def check_limits(output: Path, unzipped: int) -> None:
    zipped = output.stat().st_size
    problems = []
    if zipped > MAX_ZIPPED:
        problems.append(f"{zipped:,} bytes zipped > {MAX_ZIPPED:,} (direct upload limit)")
    if unzipped > MAX_UNZIPPED:
        problems.append(f"{unzipped:,} bytes unzipped > {MAX_UNZIPPED:,} (Lambda limit)")
    if problems:
        raise PackageError("package too large: " + "; ".join(problems))


def build(uv: str, output: Path, work: Path) -> str:
    work.mkdir(parents=True, exist_ok=True)
    requirements = work / "requirements.txt"
    site = work / "site"
    export_requirements(uv, requirements)
    install_requirements(uv, requirements, site)
    files = collect(site)
    if NATIVE_MARKER not in files:
        raise PackageError(f"{NATIVE_MARKER} missing: not built for Lambda arm64/{PYTHON_VERSION}")
    unzipped = write_zip(files, output)
    check_limits(output, unzipped)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    print(
        f"{output}: {len(files)} files, {output.stat().st_size:,} bytes zipped, "
        f"{unzipped:,} bytes unzipped, sha256 {digest}"
    )
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv binary")
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "lambda.zip")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "lambda")
    args = parser.parse_args(argv)
    try:
        build(args.uv, args.output.resolve(), args.work.resolve())
    except PackageError as exc:
        print(f"lambda-package: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
