"""Shared fixtures. DomainBed-dependent tests need DOMAINBED_ROOT (or an importable `domainbed`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from domainbed_itl.bridge.domainbed_env import DomainBedNotFound, find_domainbed_root, with_pythonpath

REPO = Path(__file__).resolve().parents[1]
# Real MNIST digits for the tests that train on them: $DOMAINBED_ITL_TEST_MNIST, a --data_dir that
# torchvision's MNIST reads offline; by default the folder beside the repository where the
# development machine keeps one. Without it those tests are skipped.
MNIST10K = Path(os.environ.get("DOMAINBED_ITL_TEST_MNIST") or REPO.parent / "shared" / "data" / "mnist10k")


def _domainbed_root():
    try:
        return find_domainbed_root(os.environ.get("DOMAINBED_ROOT") or None)
    except DomainBedNotFound:
        if os.environ.get("DOMAINBED_ROOT"):
            raise
        return None


def pytest_configure(config: pytest.Config) -> None:
    """A background job of a non-interactive shell (`pytest ... &`) starts with SIGINT ignored,
    and the commands the tests start would inherit that: the tests that interrupt a command as
    Ctrl-C does need SIGINT delivered, as on a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


DOMAINBED_ROOT = _domainbed_root()
if DOMAINBED_ROOT is not None and str(DOMAINBED_ROOT) not in sys.path:
    sys.path.insert(0, str(DOMAINBED_ROOT))

needs_domainbed = pytest.mark.skipif(
    DOMAINBED_ROOT is None,
    reason="needs a DomainBed checkout: set DOMAINBED_ROOT to a clone of facebookresearch/DomainBed")
needs_mnist10k = pytest.mark.skipif(
    not (MNIST10K / "MNIST" / "raw").is_dir(),
    reason=f"needs offline MNIST digits at {MNIST10K} (set DOMAINBED_ITL_TEST_MNIST)")


@pytest.fixture
def domainbed_root() -> Path:
    """The DomainBed checkout; the test is skipped without one."""
    if DOMAINBED_ROOT is None:
        pytest.skip("needs a DomainBed checkout: set DOMAINBED_ROOT to a clone of "
                    "facebookresearch/DomainBed")
    return DOMAINBED_ROOT


@pytest.fixture
def mnist10k() -> Path:
    """The offline MNIST data folder (DOMAINBED_ITL_TEST_MNIST)."""
    if not (MNIST10K / "MNIST" / "raw").is_dir():
        pytest.skip(f"needs offline MNIST digits at {MNIST10K} (set DOMAINBED_ITL_TEST_MNIST)")
    return MNIST10K


@pytest.fixture(scope="session")
def patched_domainbed(tmp_path_factory) -> Path:
    """A copy of the DomainBed checkout with our patch series applied by our own patch command."""
    import shutil
    import subprocess

    if DOMAINBED_ROOT is None:
        pytest.skip("needs a DomainBed checkout: set DOMAINBED_ROOT to a clone of "
                    "facebookresearch/DomainBed")
    copy = tmp_path_factory.mktemp("domainbed") / "DomainBed"
    shutil.copytree(DOMAINBED_ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.patch", "apply",
                    "--domainbed_root", str(copy)], check=True, capture_output=True, text=True)
    return copy


def domainbed_env(root: Path) -> dict:
    """The environment for a subprocess that imports DomainBed from `root` and this repository's
    domainbed_itl."""
    return with_pythonpath(root, with_pythonpath(REPO))


@pytest.fixture
def one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STANDIN = Path(__file__).resolve().parent / "domainbed_standin"


def _forget_domainbed() -> None:
    for name in [n for n in sys.modules if n == "domainbed" or n.startswith("domainbed.")]:
        del sys.modules[name]


@pytest.fixture
def isolated_imports(monkeypatch):
    """No DomainBed module imported when the test starts; sys.path and DomainBed's modules as
    they were, after it (a test that must import a given checkout afresh)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = {n: m for n, m in sys.modules.items() if n == "domainbed" or n.startswith("domainbed.")}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [n for n in sys.modules if n == "domainbed" or n.startswith("domainbed.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def bridge(monkeypatch):
    """DomainBed's `algorithms` and `hparams_registry` with our algorithms registered in process
    (no patch): the real checkout when there is one, else the stand-in under
    tests/domainbed_standin (`bridge.real` says which)."""
    import domainbed_itl

    if DOMAINBED_ROOT is None:
        monkeypatch.syspath_prepend(str(STANDIN))
        _forget_domainbed()
    from domainbed import algorithms, hparams_registry

    domainbed_itl.register()
    yield SimpleNamespace(algorithms=algorithms, hparams_registry=hparams_registry,
                          real=DOMAINBED_ROOT is not None)
    if DOMAINBED_ROOT is None:
        _forget_domainbed()


@pytest.fixture
def domainbed(domainbed_root):
    """DomainBed's (algorithms, datasets, hparams_registry) with our algorithms registered in
    process (no patch)."""
    import domainbed_itl
    from domainbed import algorithms, datasets, hparams_registry

    domainbed_itl.register()
    return algorithms, datasets, hparams_registry


_HOLD_LOCK = ("import sys, time\n"
              "from domainbed_itl.files.runlock import folder_lock\n"
              "with folder_lock(sys.argv[1], command='holder --of ' + sys.argv[1]):\n"
              "    print('locked', flush=True)\n"
              "    time.sleep(600)\n")


def hold_lock(folder):
    """A separate process holding the write lock of `folder` (started once it holds it); its
    command reads 'holder --of <folder>'. Kill it to release the lock."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.fixture
def locked_folder(tmp_path):
    """A folder whose write lock another process holds for the test."""
    import signal

    folder = tmp_path / "locked"
    process = hold_lock(folder)
    yield folder
    process.send_signal(signal.SIGKILL)
    process.wait()


class CountingLoss(torch.nn.Module):
    """Wraps a loss and counts its calls in `.calls`."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.calls = loss, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.loss(*args, **kwargs)


def docs_family_example() -> str:
    """The module of docs/losses.md's "A family of your own", as a user would copy it."""
    import re

    text = (REPO / "docs" / "losses.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "register_family(" in b]
    return block


def spy_on_heldout(trainer):
    """A dict that each outer step of `trainer` fills with the inner networks ("thetas"), the
    step's draws and what the held-out objective returned ("out")."""
    captured = {}
    original = trainer._heldout

    def spy(thetas, draws):
        captured["thetas"], captured["draws"] = thetas, draws
        captured["out"] = original(thetas, draws)
        return captured["out"]

    trainer._heldout = spy
    return captured


# A tiny meta-training problem, shared by the trainer's, the run folder's and meta_train's tests.
TINY_META = dict(inner_steps=8, hidden=(8,), hvp_batch=32, eval_size=None, batch_size=16)
TIMING = ("time_inner_s", "time_hypergradient_s", "time_eval_s", "time_diagnostics_s", "time_step_s")


def tiny_data(num_domains=4, per_domain=48, features=12, classes=3, seed=0):
    """Synthetic rotated domains small enough for a meta-training step in well under a second."""
    from domainbed_itl.meta.data import synthetic_domains

    return synthetic_domains(num_domains, per_domain, features, classes, seed=seed, noise=1.5,
                             degrees_per_domain=20)


def tiny_config(**kw):
    """MetaConfig of TINY_META with `kw` on top."""
    from domainbed_itl.meta.config import MetaConfig

    return MetaConfig(**{**TINY_META, **kw})


def meta_checkpoint(path):
    """A meta-training run's checkpoint, read as the runner reads it."""
    from domainbed_itl.files.runfolder import load_checkpoint
    from domainbed_itl.meta.runner import META_RUN

    return load_checkpoint(path, META_RUN)


def untimed(record):
    """A metrics record without its wall-clock timings."""
    return {k: v for k, v in record.items() if k not in TIMING}


def processes_naming(folder):
    """The ids of this machine's processes whose command line names `folder` (by its name)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
            if proc.name.isdigit() and folder.name in command:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def collect_single_source(*args, env=None):
    """`collect_single_source` with `args` in a child interpreter; its CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.collect_single_source", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def no_domainbed_env():
    """The environment of a child that sees this checkout but no DomainBed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return env
