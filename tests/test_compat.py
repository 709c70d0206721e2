"""The supported transformers range is enforced: outside it gtakit refuses to load in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gtakit.models.configuration_gtakit import SUPPORTED_TRANSFORMERS, check_transformers_version

pytestmark = pytest.mark.slow  # fresh interpreters importing gtakit under a faked transformers

# Pretend an older transformers is installed, then import gtakit the way a script or the command line does.
IMPORT_WITH_VERSION = """
import sys
import transformers
transformers.__version__ = {version!r}
sys.argv[0] = {argv0!r}
import gtakit
"""


@pytest.mark.parametrize("version", ["5.17.0", "5.24.0", "5.39.2"])
def test_supported_versions_pass(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.57.1", "5.16.2", "6.0.0rc1", "6.1.0"])
def test_unsupported_versions_are_refused_with_the_fix(version):
    fix = f"{version} is installed; run: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
    with pytest.raises(ImportError, match=fix):
        check_transformers_version(version)


def test_pyproject_states_the_same_range():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"transformers{SUPPORTED_TRANSFORMERS}"' in pyproject


def _import_with(version: str, argv0: str) -> subprocess.CompletedProcess:
    code = IMPORT_WITH_VERSION.format(version=version, argv0=argv0)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_refuses_an_old_transformers():
    result = _import_with("5.16.0", "script.py")
    assert result.returncode != 0
    assert "ImportError: gtakit models need transformers >=5.17,<6 but 5.16.0 is installed" in result.stderr


def test_command_line_refuses_in_one_line():
    result = _import_with("5.16.0", "/usr/local/bin/gtakit")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gtakit: gtakit models need transformers >=5.17,<6 but 5.16.0 is installed; "
        "run: pip install 'transformers>=5.17,<6'"
    ]
