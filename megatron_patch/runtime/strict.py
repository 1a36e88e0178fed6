"""The strict device check: make the CPU test suite fail where a GPU run would fail on a misplaced tensor.

On the CPU path every CUDA request lands on the CPU, so a tensor created on the bare default device can never
clash with the model there; on a GPU the same code stops with "Expected all tensors to be on the same device".
Under this check (``MEGATRON_PATCH_STRICT_DEVICE=1`` in a process without CUDA) the CPU path plays a GPU:

* ``local_device()`` is a symbolic ``cuda:0``. A tensor is *on the device* when it was created with a CUDA device
  argument, moved with ``.cuda()`` / ``.to(cuda)``, is a parameter or buffer of a model placed by
  ``place_model``, or is the result of an op with such an input (views included). Its storage stays on the CPU;
  only a mark on the tensor (and on views of it, through ``_base``) says where it would live.
* ``t.device`` / ``t.is_cuda`` / ``t.get_device()`` of a device tensor answer as on a GPU, so code that follows a
  tensor's device (``torch.arange(n, device=x.device)``) places its results where a GPU run would.
* Every torch call is checked, as CUDA checks it: an op that mixes a device tensor with a host tensor of
  dim > 0 raises ``DeviceMismatchError`` naming the op (a 0-dim host tensor is a legal operand on CUDA); so does
  an in-place op that writes device values into a host tensor, a random op whose ``generator`` lives on the
  other side, and a collective (``torch.distributed``) given a host tensor where NCCL would need a CUDA tensor.
  ``copy_`` / ``to`` / ``cuda`` / ``cpu`` cross sides legally.

What it cannot see: ops run by the autograd engine during backward (function modes do not reach them; the
forward that built the graph is checked), code run in other threads, and tensors made in C++ code that are
neither views nor torch calls. Those are left unmarked (host), so the check may report a false alarm there but
never hides a mismatch it did see.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.distributed as dist

from .cpu import _CudaToCpuMode, _is_cuda_device

STRICT_ENV = "MEGATRON_PATCH_STRICT_DEVICE"
SYMBOLIC_DEVICE = torch.device("cuda", 0)
_MARK = "_megatron_patch_on_device"
_ACTIVE = False
_GENERATORS: weakref.WeakSet = weakref.WeakSet()  # generators made by device_generator (they live on the device)
_CPU = torch.device("cpu")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
# Legal across devices on CUDA too: copies, moves, and the type query Module._apply makes before a move.
_CROSS_DEVICE_OK = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu,
                    torch._has_compatible_shallow_copy_type}
# isend / irecv stay unwrapped: P2POp accepts only the originals (their P2POps are checked in batch_isend_irecv).
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "send", "recv", "batch_isend_irecv")


class DeviceMismatchError(RuntimeError):
    """An op met tensors that would live on different devices on a GPU."""


def requested() -> bool:
    return os.environ.get(STRICT_ENV, "0") == "1"


def is_active() -> bool:
    return _ACTIVE


# --- marks ------------------------------------------------------------------------------------------------------


def mark(tensor: torch.Tensor) -> torch.Tensor:
    setattr(tensor, _MARK, True)
    return tensor


def _plain(tensor) -> bool:
    """A tensor this check reasons about; subclasses with their own dispatch (ShardedTensor, DTensor) are neutral."""
    return type(tensor) in _PLAIN_TYPES


def is_marked(tensor: torch.Tensor) -> bool:
    """On the device: marked itself, or a view of a marked tensor (views made in C++ carry no mark of their own)."""
    if not _plain(tensor):
        return False
    while tensor is not None:
        if getattr(tensor, _MARK, False):
            return True
        tensor = tensor._base
    return False


def mark_module(module: torch.nn.Module) -> None:
    """Mark every parameter and buffer of a model placed on the device (no-op unless the check is active)."""
    if _ACTIVE:
        for tensor in (*module.parameters(), *module.buffers()):
            mark(tensor)


def mark_generator(generator: torch.Generator) -> None:
    if _ACTIVE:
        _GENERATORS.add(generator)


def _tensors(values):
    for value in values:
        if type(value) in _PLAIN_TYPES:
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if type(v) in _PLAIN_TYPES)


def _mark_outputs(result):
    if isinstance(result, torch.Tensor):
        mark(result)
    elif isinstance(result, (list, tuple)):
        for value in result:
            if isinstance(value, torch.Tensor):
                mark(value)
    return result


def _name(func) -> str:
    """'torch.cat', 'Tensor.add_', 'torch.nn.functional.embedding': how the error names the op."""
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if qualname.startswith("TensorBase."):
        return "Tensor." + qualname.removeprefix("TensorBase.")
    if qualname.startswith("_VariableFunctionsClass."):
        return "torch." + qualname.removeprefix("_VariableFunctionsClass.")
    if "." in qualname:
        return qualname
    module = getattr(func, "__module__", None) or "torch"
    module = {"torch._C._VariableFunctions": "torch", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{qualname}"


def _describe(tensor: torch.Tensor) -> str:
    return f"a host tensor of shape {tuple(tensor.shape)} ({str(tensor.dtype).removeprefix('torch.')})"


# --- the mode -----------------------------------------------------------------------------------------------------


def _target_device(args, kwargs):
    """The device a ``Tensor.to`` call asks for: 'cuda', 'cpu' or None (a dtype-only conversion)."""
    candidates = [kwargs.get("device"), *(args[1:2])]
    for candidate in candidates:
        if isinstance(candidate, torch.Tensor):
            return "cuda" if is_marked(candidate) else "cpu"
        if candidate is None or isinstance(candidate, torch.dtype):
            continue
        return "cuda" if _is_cuda_device(candidate) else "cpu"
    return None


class StrictDeviceMode(_CudaToCpuMode):
    """The CPU path's device redirection plus the placement bookkeeping and checks described in the module doc."""

    redirects_every_caller = True  # this package's code asks for the symbolic device too

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if type(owner).__name__ == "getset_descriptor":
            return self._attribute(owner.__name__, func, args)
        if func is torch.Tensor.get_device:
            return 0 if is_marked(args[0]) else -1
        if func is torch.Tensor.cuda:
            tensor = args[0]
            return tensor if is_marked(tensor) else mark(tensor.clone())
        if func is torch.Tensor.cpu:
            return args[0].clone() if is_marked(args[0]) else args[0]
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if "device" in kwargs:  # a factory call (zeros, arange, tensor, empty_like(..., device=...)): it decides
            on_device = _is_cuda_device(kwargs["device"])
            self._check_generator(func, kwargs, on_device)
            result = super().__torch_function__(func, types, args, kwargs)
            return _mark_outputs(result) if on_device else result
        return self._op(func, types, args, kwargs)

    def _attribute(self, name, func, args):
        tensor = args[0]
        if not _plain(tensor):
            return func(*args)
        if func.__name__ == "__set__":
            if name == "data":  # param.data = value: the parameter now lives where value lives
                func(*args)
                if is_marked(args[1]):
                    mark(tensor)
                elif getattr(tensor, _MARK, False):
                    delattr(tensor, _MARK)
                return None
            return func(*args)
        if name == "device":
            return SYMBOLIC_DEVICE if is_marked(tensor) else func(*args)
        if name == "is_cuda":
            return is_marked(tensor)
        if name == "is_cpu":
            return not is_marked(tensor)
        result = func(*args)
        if isinstance(result, torch.Tensor) and is_marked(tensor):  # .data, .grad, .T, .mT, .real ...
            mark(result)
        return result

    def _to(self, args, kwargs):
        tensor, target = args[0], _target_device(args, kwargs)
        args = list(args)
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            args[1] = args[1].dtype  # to(other, ...) takes other's dtype; its device was read above
        elif len(args) > 1 and not isinstance(args[1], torch.dtype) and args[1] is not None:
            args[1] = _CPU
        if kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": _CPU}
        was_marked = is_marked(tensor)
        if target is not None and (target == "cuda") != was_marked:
            kwargs = {**kwargs, "copy": True}  # a real move makes a new tensor; so does this one
        result = torch.Tensor.to(*args, **kwargs)
        on_device = was_marked if target is None else target == "cuda"
        return mark(result) if on_device else result

    def _op(self, func, types, args, kwargs):
        tensors = list(_tensors((*args, *kwargs.values())))
        on_device = [t for t in tensors if is_marked(t)]
        if on_device and func not in _CROSS_DEVICE_OK:
            checked = tensors
            if func in _INDEXING:  # CUDA moves host index tensors itself: x[host_ids] is legal
                checked = [args[0], *_tensors(args[2:])]
            host = [t for t in checked if t.dim() > 0 and not is_marked(t)]
            name = _name(func)
            if host:
                raise DeviceMismatchError(
                    f"{name}: mixes a device tensor of shape {tuple(on_device[0].shape)} with {_describe(host[0])}; "
                    "on a GPU this op fails (create the tensor with device=local_device() or move it with .to())")
            first = args[0] if args else None
            in_place = name.endswith("_") and not name.endswith("__")
            if in_place and isinstance(first, torch.Tensor) and not is_marked(first):
                raise DeviceMismatchError(f"{name}: writes device values into {_describe(args[0])} in place")
        self._check_generator(func, kwargs, bool(on_device))
        result = super().__torch_function__(func, types, args, kwargs)
        if on_device and func is not torch.Tensor.copy_:
            _mark_outputs(result)
        return result

    @staticmethod
    def _check_generator(func, kwargs, on_device: bool) -> None:
        generator = kwargs.get("generator")
        if generator is not None and (generator in _GENERATORS) != on_device:
            where = ("the device", "the host") if on_device else ("the host", "the device")
            raise DeviceMismatchError(f"{_name(func)}: samples on {where[0]} with a generator on {where[1]} "
                                      "(make it with runtime.device.device_generator)")


# --- collectives --------------------------------------------------------------------------------------------------


def _gloo_groups() -> set[int]:
    """Groups megatron-core creates with gloo on purpose (host tensors are right there)."""
    from megatron.core import parallel_state

    return {id(group) for name, group in vars(parallel_state).items()
            if name.endswith("_GLOO") and group is not None and not isinstance(group, (list, dict))}


def _checked_collective(name: str, collective):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        groups = [a for a in (*args, *kwargs.values()) if isinstance(a, dist.ProcessGroup)]
        # Inside backward the engine's gradients carry no marks (the check does not see backward ops).
        in_backward = torch._C._current_autograd_node() is not None
        if _ACTIVE and not in_backward and (not groups or id(groups[0]) not in _gloo_groups()):
            values = [*args, *kwargs.values()]
            if name == "batch_isend_irecv":
                values = [op.tensor for op in args[0]]
            for tensor in _tensors(values):
                if not is_marked(tensor):
                    raise DeviceMismatchError(
                        f"torch.distributed.{name}: {_describe(tensor)} where NCCL needs a device tensor")
        return collective(*args, **kwargs)

    call._megatron_patch_strict = True
    return call


def _check_collectives() -> None:
    for name in _COLLECTIVES:
        collective = getattr(dist, name, None)
        if collective is not None and not getattr(collective, "_megatron_patch_strict", False):
            setattr(dist, name, _checked_collective(name, collective))


def activate() -> StrictDeviceMode:
    """Turn the check on for this process (called by ``enable_cpu_path`` when ``MEGATRON_PATCH_STRICT_DEVICE=1``);
    returns the mode to enter in place of the plain CPU path's."""
    global _ACTIVE
    _check_collectives()
    _ACTIVE = True
    return StrictDeviceMode()


def deactivate() -> None:
    """Turn the check off (``disable_cpu_path``): ``local_device()`` is the CPU again, collectives go unchecked."""
    global _ACTIVE
    _ACTIVE = False
