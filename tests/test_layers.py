"""The package's layers are a contract (pyproject.toml, [tool.importlinter]) that the tests check."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def lint_available():
    if not LINT.exists():
        pytest.fail("lint-imports is not installed; run `make install` (import-linter is a test dependency)")


def test_every_layer_contract_is_kept(lint_available):
    proc = lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, leak", [
    ("routing/policy.py", "import hera_core.offline.harness"),        # live path -> offline tool
    ("routing/runtime.py", "import hera_core.backends.llamacpp"),     # routing -> a concrete engine
    ("serving/server.py", "from hera_core.backends.cloud import CloudEngine"),  # server -> an engine
    ("native/radix.py", "import hera_core.routing.ledger"),           # a lower layer -> a higher one
    ("offline/bfcl.py", "import hera_core.offline.workloads"),        # the offline circle back
    ("backends/llamacpp/kvcache.py", "import hera_core.backends.llamacpp.scheduler"),  # the slot cache -> its user
])
def test_a_leak_breaks_a_contract(lint_available, tmp_path, module, leak):
    """The contracts can fail: the same tree with one forbidden import added is refused."""
    shutil.copytree(ROOT / "hera_core", tmp_path / "hera_core", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "hera_core" / module
    target.write_text(target.read_text() + f"\n{leak}  # the leak under test\n")
    proc = lint(tmp_path, tmp_path)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout, proc.stdout[-2000:]
