"""`make lambda-package`: the artifact the template deploys, built from uv.lock.

Builds it once (scripts/lambda_package.py, as the Makefile runs it) into a temporary
directory: wheels come from the uv cache or the package index, like `make install`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.infra.conftest import ROOT, load_sam_template

SCRIPT = ROOT / "scripts" / "lambda_package.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lambda_package", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lambda_package = _load_script()


def _uv() -> str | None:
    bundled = ROOT / ".cache" / "uv" / "bin" / "uv"  # what `make install` bootstraps
    if bundled.exists():
        return str(bundled)
    return shutil.which("uv")


@dataclass(frozen=True)
class Built:
    zip_path: Path
    work: Path
    stdout: str

    def sha256(self) -> str:
        return hashlib.sha256(self.zip_path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (make install bootstraps it)")
    base = tmp_path_factory.mktemp("lambda-package")
    output, work = base / "dist" / "lambda.zip", base / "work"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--uv", uv, "--output", str(output), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Built(output, work, result.stdout)


def test_package_is_within_lambda_limits(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as zf:
        unzipped = sum(info.file_size for info in zf.infolist())
    assert built.zip_path.stat().st_size <= lambda_package.MAX_ZIPPED == 50 * 2**20
    assert unzipped <= lambda_package.MAX_UNZIPPED == 250 * 2**20
    assert f"sha256 {built.sha256()}" in built.stdout


def test_package_holds_what_the_functions_need_and_nothing_else(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as zf:
        names = zf.namelist()
    files = set(names)
    # Compiled for Lambda arm64 / CPython 3.12, not for this machine.
    assert lambda_package.NATIVE_MARKER in files
    for required in (
        "cloud/__init__.py",
        "cloud/handlers/verify.py",
        "aws_lambda_powertools/__init__.py",
        "aws_xray_sdk/__init__.py",
        "pydantic/__init__.py",
        "boto3/__init__.py",
        "botocore/__init__.py",
    ):
        assert required in files, required
    # Every handler the template names (whose module exists yet) is in the artifact.
    for resource in load_sam_template()["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            module = resource["Properties"]["Handler"].rpartition(".")[0]
            path = module.replace(".", "/") + ".py"
            if (ROOT / path).exists():
                assert path in files, path
    for name in names:
        top = name.split("/")[0]
        assert top not in {"local_agent", "tests", "bench", "bin"}, name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name
        assert not top.startswith(("pytest", "moto", "cfn_lint", "mypy", "ruff")), name


def test_dev_tools_are_not_exported(built: Built) -> None:
    requirements = (built.work / "requirements.txt").read_text()
    pinned = {line.split("==")[0] for line in requirements.splitlines() if "==" in line}
    assert {"aws-lambda-powertools", "boto3", "botocore", "pydantic"} <= pinned
    assert not pinned & {"pytest", "moto", "cfn-lint", "aws-sam-translator", "mypy", "ruff"}
    assert "--hash=sha256:" in requirements  # installed with --require-hashes


def test_archive_is_deterministic(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as zf:
        infos = zf.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    modes = {info.external_attr >> 16 for info in infos}
    assert modes == {0o100644, 0o040755}


def test_same_inputs_give_the_same_bytes(built: Built) -> None:
    # The installed tree moved elsewhere and zipped again: no path or time leaks in.
    site = built.work / "site"
    moved = built.work / "elsewhere" / "site"
    moved.parent.mkdir()
    site.rename(moved)
    try:
        again = built.work / "again.zip"
        lambda_package.write_zip(lambda_package.collect(moved), again)
    finally:
        moved.rename(site)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == built.sha256()


def test_limits_are_enforced(tmp_path: Path) -> None:
    too_big = tmp_path / "big.zip"
    with too_big.open("wb") as f:
        f.truncate(lambda_package.MAX_ZIPPED + 1)  # sparse: no real 50 MB written
    with pytest.raises(lambda_package.PackageError, match="zipped"):
        lambda_package.check_limits(too_big, unzipped=1)
    small = tmp_path / "small.zip"
    small.write_bytes(b"PK")
    with pytest.raises(lambda_package.PackageError, match="unzipped"):
        lambda_package.check_limits(small, unzipped=lambda_package.MAX_UNZIPPED + 1)
    lambda_package.check_limits(small, unzipped=lambda_package.MAX_UNZIPPED)
