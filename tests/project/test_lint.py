"""The repository passes ruff with the configuration in pyproject.toml ([tool.ruff])."""

import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:] + (
        "\n(ruff is in the test extra: pip install -e '.[test]')" if "No module named" in result.stderr
        else "")
