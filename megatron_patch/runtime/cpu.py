"""Run megatron-core on a machine without CUDA (gloo backend), without editing megatron-core.

megatron-core 0.16 assumes CUDA in a handful of places (see ../shared/notes/megatron-core-on-cpu.md):
tensors created with ``device="cuda"`` or ``device=torch.cuda.current_device()``, ``torch.cuda.synchronize()``
in the pipeline p2p code, and an RNG tracker that forks the CUDA generator. Rather than patching each call
site (they move between releases), a ``TorchFunctionMode`` rewrites CUDA device arguments to the CPU and three
``torch.cuda`` functions get CPU stand-ins; the RNG tracker is replaced by one that forks the CPU generator.

The rewriting is scoped to megatron-core: it applies only to calls made by megatron-core's own code (the first
caller outside torch), so transformers, users and this package see torch unchanged (``torch.zeros(device="cuda")``
still fails there, ``Tensor.type()`` still says ``torch.FloatTensor``). ``init_distributed`` enters it
(``enable_cpu_path``) and ``destroy_distributed`` leaves it (``disable_cpu_path``), restoring ``torch.cuda``.
Everything here is a no-op when CUDA is available.

With ``MEGATRON_PATCH_STRICT_DEVICE=1`` the mode is the strict one of ``runtime.strict``: a test instrument that
plays a GPU for the whole process (this package's code included), tracking which tensors would live on the GPU and
raising where a GPU run would fail on a misplaced tensor.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_INSTALLED = False  # the RNG tracker and recompute wrappers: megatron-core's own objects, installed once
_MODE: TorchFunctionMode | None = None
_SAVED_CUDA_FUNCTIONS: dict[str, object] = {}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device is a CUDA ordinal (that is what torch.cuda.current_device() returns).
    return isinstance(device, int) and not isinstance(device, bool)


# Frames between a caller and the mode, skipped when looking for who asked: this machinery, torch itself (torch code
# run on a caller's behalf, e.g. Module.cuda() moving tensors), and the stdlib's call plumbing.
_PASS_THROUGH = ("megatron_patch.runtime.cpu", "megatron_patch.runtime.strict", "torch", "contextlib", "functools")


def _called_from_megatron_core() -> bool:
    """Whether the torch call being handled was made by megatron-core's own code (its first caller outside torch)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == name or module.startswith(name + ".") for name in _PASS_THROUGH):
            return module == "megatron.core" or module.startswith("megatron.core.")
        frame = frame.f_back
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of megatron-core's torch calls to the CPU."""

    _CPU = torch.device("cpu")
    # The strict check plays a GPU for every caller (it must see this package's code too); the plain path only
    # for megatron-core.
    redirects_every_caller = False

    def _redirects(self) -> bool:
        return self.redirects_every_caller or _called_from_megatron_core()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda and self._redirects():
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizer and grad clipping assert type strings such as 'torch.cuda.FloatTensor';
            # only its own calls get the CUDA spelling.
            name = func(*args)
            if name.startswith("torch.cuda.") or not _called_from_megatron_core():
                return name
            return name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]) and self._redirects():
            kwargs = {**kwargs, "device": self._CPU}
        if kwargs.get("pin_memory") and self._redirects():
            # pinned host memory needs a CUDA driver; on a CPU-only machine it has no purpose.
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            if _is_cuda_device(args[1]) and self._redirects():
                args = (args[0], self._CPU, *args[2:])
        return func(*args, **kwargs)


class CPURNGStatesTracker:
    """Drop-in for megatron-core's ``CudaRNGStatesTracker`` that forks the CPU default generator.

    Megatron keeps one RNG stream per model-parallel rank (dropout inside TP regions must differ across TP
    ranks) next to the default stream; on a GPU those are CUDA generator states, here CPU generator states.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _run_under_mode(cls, method: str) -> None:
    original = cls.__dict__[method]
    is_static = isinstance(original, staticmethod)
    func = original.__func__ if is_static else original

    def wrapped(*args, **kwargs):
        with _CudaToCpuMode():
            return func(*args, **kwargs)

    setattr(cls, method, staticmethod(wrapped) if is_static else wrapped)


def _for_megatron_core(original, stand_in):
    """``torch.cuda.<name>`` answering megatron-core's calls with the CPU stand-in and everyone else's as torch does."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        return (stand_in if _called_from_megatron_core() else original)(*args, **kwargs)

    return call


class _HostStream:
    """What megatron-core's alltoall MoE token dispatcher asks of a CUDA side stream (``wait_stream``,
    ``record_event`` and the event's ``synchronize``); on the CPU every operation is already in order. One object
    stands for every stream, so the dispatcher sees its side stream as the current one and records nothing."""

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


_HOST_STREAM = _HostStream()

# Megatron calls these unconditionally; without CUDA they raise. Ordinal 0 is mapped to the CPU by the mode.
_CUDA_STAND_INS = {
    "current_device": lambda: 0,
    "synchronize": lambda *args, **kwargs: None,
    "device_count": lambda: 0,
    # The alltoall token dispatcher (MoE expert parallelism) copies its split sizes to the host on a side stream.
    "Stream": lambda *args, **kwargs: _HOST_STREAM,
    "current_stream": lambda *args, **kwargs: _HOST_STREAM,
    "stream": lambda *args, **kwargs: contextlib.nullcontext(),
}


def _install_into_megatron_core() -> None:
    """The CPU RNG tracker and the recompute wrappers: megatron-core's own objects, replaced once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves and restores the "CUDA" RNG state around the recomputed forward; on the CPU path
    # the device generator is the CPU one (as in CPURNGStatesTracker.fork).
    if hasattr(mcore_random, "_get_cuda_rng_state") and hasattr(mcore_random, "_set_cuda_rng_state"):
        mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    # Function modes do not reach code run by the autograd engine during backward: the recomputed forward of
    # activation checkpointing would build its tensors on "cuda" again. (It runs under the plain mode even when
    # the strict check is on: it repeats a forward the check has already seen.)
    for cls_name, method in (("CheckpointFunction", "backward"), ("CheckpointWithoutOutput", "_recompute")):
        cls = getattr(mcore_random, cls_name, None)
        if cls is not None and hasattr(cls, method):
            _run_under_mode(cls, method)
    # The same for expert parallelism's all-to-all: its backward is another all-to-all that allocates its output
    # on torch.cuda.current_device().
    from megatron.core.tensor_parallel import mappings

    if hasattr(mappings, "_AllToAll"):
        _run_under_mode(mappings._AllToAll, "backward")
    from .moe_fixes import host_split_sizes_for_alltoall

    host_split_sizes_for_alltoall()
    _INSTALLED = True


def _enter(mode: TorchFunctionMode) -> None:
    global _MODE
    _MODE = mode
    _MODE.__enter__()


def _leave() -> None:
    """Exit the mode (it is the innermost one: nothing else of ours stays entered across calls)."""
    global _MODE
    if _MODE is not None and _MODE in torch.overrides._get_current_function_mode_stack():
        _MODE.__exit__(None, None, None)
    _MODE = None


def enable_cpu_path() -> bool:
    """Make megatron-core run on the CPU when CUDA is absent. Returns True if the CPU path is active.

    Idempotent; undone by ``disable_cpu_path``. Affects only this process (and the thread that calls it: torch
    function modes are per thread). A process that enabled the plain path (e.g. a forked test worker) switches to
    the strict one when it is asked.
    """
    global _ENABLED
    if cuda_available():
        return False
    from . import strict
    from .versions import check_megatron_version

    # Every redirection here is written against megatron-core 0.16's internals (see the module doc).
    check_megatron_version()

    if _ENABLED:
        if strict.requested() and not strict.is_active():
            _leave()
            _enter(strict.activate())
        return True
    _install_into_megatron_core()
    for name, stand_in in _CUDA_STAND_INS.items():
        _SAVED_CUDA_FUNCTIONS[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, _for_megatron_core(_SAVED_CUDA_FUNCTIONS[name], stand_in))
    _enter(strict.activate() if strict.requested() else _CudaToCpuMode())
    _ENABLED = True
    return True


def disable_cpu_path() -> None:
    """Leave the CPU path: exit the mode and give ``torch.cuda`` its functions back. No-op when it is not active."""
    global _ENABLED
    if not _ENABLED:
        return
    _leave()
    from . import strict

    strict.deactivate()
    for name, original in _SAVED_CUDA_FUNCTIONS.items():
        setattr(torch.cuda, name, original)
    _SAVED_CUDA_FUNCTIONS.clear()
    _ENABLED = False
