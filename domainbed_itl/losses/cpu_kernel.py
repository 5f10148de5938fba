"""The fused C++ CPU kernel of the fixed-ω Taylor loss: opt-in, compiled on first use.

See docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

SOURCE = Path(__file__).with_name("taylor_kernel.cpp")
ENV = "DOMAINBED_ITL_CPU_KERNEL"
_state: dict = {}
_off = contextvars.ContextVar("domainbed_itl_cpu_kernel_off", default=False)


def enabled() -> bool:
    """Whether the user opted in to the kernel: DOMAINBED_ITL_CPU_KERNEL=1 (0 or unset: no),
    outside a `disabled()` block."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 1 (use the compiled C++ kernel on CPU) or 0, got {value!r}")
    return value == "1" and not _off.get()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the opt-in is ignored: TaylorLoss's "auto" backend neither loads nor
    builds the kernel (for the few CPU evaluations of a loss check, which must not make a GPU
    job compile the kernel or wait on a stale build lock)."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def load() -> Optional[ModuleType]:
    """The compiled kernel module (built now if need be), or None where it cannot be built."""
    if "module" not in _state:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it logs that a CPU-only machine has no CUDA runtime
        try:
            from torch.utils.cpp_extension import load as build

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _state["module"] = build("domainbed_itl_taylor_kernel", [str(SOURCE)],
                                         extra_cflags=["-O3"], verbose=False)
        except Exception as error:  # no compiler, no ninja, read-only cache...: use pure torch
            _state["module"] = None
            _state["error"] = f"{type(error).__name__}: {error}"
            warnings.warn("domainbed-itl: the C++ Taylor-loss kernel could not be built, using the "
                          f"slower pure-torch path ({_state['error'].splitlines()[0]})", stacklevel=3)
        finally:
            quiet.setLevel(level)
    return _state["module"]


def load_error() -> Optional[str]:
    """Why the kernel could not be built, if it could not."""
    return _state.get("error")
