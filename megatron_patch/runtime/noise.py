"""What reaches the terminal besides our own output: third-party warnings are off unless --verbose.

megatron-core, torch and transformers warn at import about optional packages (Transformer Engine / Apex not
installed, a dozen times), deprecations, ``CUDA_DEVICE_MAX_CONNECTIONS``, "No CUDA runtime is found". None of it
is something the user acts on, and it buries the lines that are. Every entry point calls ``quiet_third_party``
first; the facts that matter are said once, in our words, by ``environment_notes``. ``--verbose`` (or
``MEGATRON_PATCH_VERBOSE=1``, which child processes inherit) shows everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

VERBOSE_ENV = "MEGATRON_PATCH_VERBOSE"

# Modules whose warnings are silenced (regex on the module a warning is attributed to).
THIRD_PARTY_MODULES = (r"(megatron\.core|torch|transformers|transformer_engine|apex|tensorboard|google|"
                       r"sentencepiece|tiktoken|huggingface_hub|safetensors|numpy)(\.|$)")
# Warnings third-party code attributes to its caller's module (ours) through ``stacklevel``.
THIRD_PARTY_MESSAGES = (
    r"Transformer Engine (and Apex )?(is |are )?not installed",
    r"Apex is not installed",
    r".*CUDA_DEVICE_MAX_CONNECTIONS",
    r".*deprecat",
)
# The same, as PYTHONWARNINGS entries ("action:message prefix"), for processes that import megatron-core first.
INHERITED_FILTERS = ("ignore:Transformer Engine and Apex are not installed", "ignore:Apex is not installed",
                     "ignore:Transformer Engine is not installed")
# Environment switches of third-party libraries (inherited by every rank): transformers' per-load progress bars
# and advisory warnings, torch's import-time log lines.
THIRD_PARTY_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                   # torch's "No CUDA runtime is found" at import, also in spawned processes
                   "TORCH_LOGS": "-torch.utils.cpp_extension"}
# Python loggers of third-party code that print warnings on every start (torch's "No CUDA runtime is found").
THIRD_PARTY_LOGGERS = ("torch.utils.cpp_extension", "torch.distributed.elastic", "torch.distributed.run",
                       "megatron.core")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings too (default: only what megatron-patch says)")


def quiet_third_party(verbose: bool | None = None) -> None:
    """Silence third-party warnings in this process and, through the environment, in the ranks it starts.

    Args:
        verbose: True to show everything; None keeps what the environment says (ranks inherit the launcher's).
    """
    if verbose is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if is_verbose():
        return
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    for message in THIRD_PARTY_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name, value in THIRD_PARTY_ENV.items():
        os.environ.setdefault(name, value)
    # Processes started with multiprocessing's spawn (a checkpoint writer) re-import the entry module, and
    # megatron-core with it, before any code of ours runs: they learn the import-time warnings through the
    # environment (PYTHONWARNINGS takes literal message prefixes only).
    inherited = [entry for entry in os.environ.get("PYTHONWARNINGS", "").split(",") if entry]
    os.environ["PYTHONWARNINGS"] = ",".join(
        inherited + [entry for entry in INHERITED_FILTERS if entry not in inherited])
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def environment_notes(transformer_impl: str = "local") -> list[str]:
    """The facts behind the silenced warnings that change what runs, one line each."""
    from importlib.util import find_spec

    import torch

    notes = []
    if not torch.cuda.is_available():
        notes.append("no CUDA GPU: running on the CPU with gloo")
    if transformer_impl == "local" and find_spec("transformer_engine") is None:
        notes.append("Transformer Engine not installed: local layer spec")
    if find_spec("apex") is None:
        notes.append("Apex not installed: torch norms and optimizer kernels")
    return notes
