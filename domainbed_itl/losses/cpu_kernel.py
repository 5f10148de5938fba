"""The fused C++ CPU kernel of the fixed-ω Taylor loss, compiled on first use.

torch.utils.cpp_extension builds `taylor_kernel.cpp` once per source version into torch's
extension cache (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), which later
processes load in milliseconds. It needs a C++ compiler and ninja; where the build fails,
`load()` returns None, the reason is kept in `load_error()`, and TaylorLoss uses its pure-torch
path with a one-time warning.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

SOURCE = Path(__file__).with_name("taylor_kernel.cpp")
_state: dict = {}


def load() -> Optional[ModuleType]:
    """The compiled kernel module, or None where it cannot be built here."""
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
                          f"slower pure-torch path ({_state['error'].splitlines()[0]})")
        finally:
            quiet.setLevel(level)
    return _state["module"]


def load_error() -> Optional[str]:
    """Why the kernel could not be built, if it could not."""
    return _state.get("error")
