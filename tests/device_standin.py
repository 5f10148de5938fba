"""A strict non-CPU device for CI, which has no GPU: tensors "on the device" hold real CPU data
(so results are real numbers) but report PyTorch's `meta` device, and any operation that mixes
them with CPU tensors raises, as CUDA does.

`on_device()` is a TorchDispatchMode: inside it, `torch.zeros(..., device="meta")`, `t.to("meta")`
and `module.to("meta")` give `DeviceTensor`s, every operation on a DeviceTensor gives
DeviceTensors, and `.to("cpu")`, `.cpu()` give plain CPU tensors again. The rules follow CUDA:

- an operation whose tensors are on both devices raises `DeviceMixError`, except that a CPU
  tensor of zero dimensions (a scalar) may meet device tensors, `copy_` may copy across, and
  advanced indexing (`t[index]`, `t[index] = v`) may take its index tensors from the CPU;
- a CPU random generator cannot draw on the device;
- `.numpy()` of a device tensor raises (the meta device has no data to give numpy).

Reading a value on the host (`.item()`, `float(t)`, `.tolist()`, a Python `if` on a tensor)
works, as it does on CUDA, where it waits for the device; `on_device(host_reads=False)` makes it
raise instead, to check that a loop never waits for the device.

What it cannot follow: `torch.tensor(data, device=...)` and `torch.as_tensor` build their tensor
without dispatching, so `on_device` replaces them in its block (built on the CPU, then moved); a
Python list indexing a device tensor becomes a meta index without data, which raises (index with
a tensor on the device instead); and code that picks its device by `x.is_cuda` (DomainBed's RSC
and SagNet) sees a device that is not CUDA and chooses the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
CPU = torch.device("cpu")
aten = torch.ops.aten


class DeviceMixError(RuntimeError):
    """An operation met tensors on the stand-in device and on the CPU."""


class HostReadError(RuntimeError):
    """A device tensor's value was read on the host where that is not allowed."""


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device: reports `meta`, computes on its CPU tensor `cpu_data`."""

    cpu_data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> "DeviceTensor":
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=DEVICE, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor):
        self.cpu_data = data

    # A traceable wrapper subclass: module.to(device) swaps it into the module's own Parameter
    # objects (torch.utils.swap_tensors), so an optimiser built before the move still holds them,
    # as it does when CUDA moves a module's parameters in place.
    def __tensor_flatten__(self) -> Tuple[list, None]:
        return ["cpu_data"], None

    @staticmethod
    def __tensor_unflatten__(inner: Dict[str, torch.Tensor], meta: None, outer_size: Any,
                             outer_stride: Any) -> "DeviceTensor":
        return DeviceTensor(inner["cpu_data"])

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"DeviceTensor({self.cpu_data!r})"

    def tolist(self) -> Any:
        _check_host_read("tolist")
        return self.cpu_data.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert a device tensor to numpy: copy it to the CPU first (.cpu())")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_device(value: Any) -> bool:
    return isinstance(value, torch.device) and value.type == "meta" or value in ("meta", DEVICE)


def _describe(t: torch.Tensor) -> str:
    where = "device" if isinstance(t, DeviceTensor) else "cpu"
    return f"{where} {tuple(t.shape)}"


# The operations that move data between devices.
_COPIES = (aten._to_copy.default, aten.copy_.default)
# Advanced indexing, whose index tensors may be on the CPU (CUDA and the meta device copy them).
_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default)


def _check_mix(func, tensors: Tuple[torch.Tensor, ...]) -> None:
    if func in _COPIES or not any(isinstance(t, DeviceTensor) for t in tensors):
        return
    cpu = [t for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0]
    if cpu:
        raise DeviceMixError(f"{func}: tensors on the device and on the CPU met: "
                             f"{', '.join(_describe(t) for t in tensors)}")


_HOST_READS = (aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default)
# Whether the innermost `on_device` block allows host reads (outside any: yes).
_HOST_READS_ALLOWED = [True]


def _check_host_read(what: Any) -> None:
    if not _HOST_READS_ALLOWED[-1]:
        raise HostReadError(f"{what}: a device tensor's value was read on the host")


def _dispatch(func, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Run `func` on the CPU data, after checking that it does not mix devices."""
    to_device = _is_device(kwargs.get("device"))
    to_cpu = "device" in kwargs and not to_device and kwargs["device"] is not None
    leaves, _ = tree_flatten((args, kwargs))
    tensors = tuple(t for t in leaves if isinstance(t, torch.Tensor))
    indices, _ = tree_flatten(args[1]) if func in _INDEXING else ([], None)
    _check_mix(func, tuple(t for t in tensors if not any(t is i for i in indices)))
    if any(t.device == DEVICE and not isinstance(t, DeviceTensor) for t in tensors):
        raise DeviceMixError(f"{func}: a meta tensor without data, made in a way the stand-in "
                             "device does not follow")
    if to_device and isinstance(kwargs.get("generator"), torch.Generator):
        raise DeviceMixError(f"{func}: a CPU random generator cannot draw on the device")
    on_device = any(isinstance(t, DeviceTensor) for t in tensors)
    if on_device and func in _HOST_READS:
        _check_host_read(func)
    if to_device:
        kwargs = {**kwargs, "device": CPU}
    wrappers = {id(t.cpu_data): t for t in tensors if isinstance(t, DeviceTensor)}
    out = func(*cpu_values(args), **cpu_values(kwargs))
    if not (on_device or to_device) or to_cpu:
        return out

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        same = wrappers.get(id(t))  # an in-place op returns its own argument
        return DeviceTensor(t) if same is None else same

    return tree_map(wrap, out)


class _OnDevice(TorchDispatchMode):
    """Sees every operation, those that make device tensors from none (factories, `.to`) too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _via_cpu(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.tensor or torch.as_tensor, which build a `device` tensor from Python data without
    dispatching: built on the CPU, then moved."""

    @functools.wraps(make)
    def built(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if _is_device(device):
            return make(data, *args, **kwargs).to(DEVICE)
        return make(data, *args, device=device, **kwargs)

    return built


@contextlib.contextmanager
def on_device(host_reads: bool = True) -> Iterator[torch.device]:
    """Within the block, device "meta" is the strict stand-in device; yields that device."""
    tensor, as_tensor = torch.tensor, torch.as_tensor
    torch.tensor, torch.as_tensor = _via_cpu(tensor), _via_cpu(as_tensor)
    _HOST_READS_ALLOWED.append(host_reads)
    try:
        with _OnDevice():
            yield DEVICE
    finally:
        torch.tensor, torch.as_tensor = tensor, as_tensor
        _HOST_READS_ALLOWED.pop()


def cpu_values(value: Any) -> Any:
    """`value` with every device tensor replaced by its CPU data (for comparisons in tests)."""
    return tree_map(lambda t: t.cpu_data if isinstance(t, DeviceTensor) else t, value)


def is_on_device(t: Optional[torch.Tensor]) -> bool:
    """Whether `t` is a tensor on the stand-in device."""
    return isinstance(t, DeviceTensor)
