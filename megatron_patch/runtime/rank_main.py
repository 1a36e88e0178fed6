"""``python -m megatron_patch.runtime.rank_main MODULE [ARGS...]``: run ``MODULE`` as ``__main__`` after silencing
third-party warnings (``noise.quiet_third_party``; ``MEGATRON_PATCH_VERBOSE=1`` shows them).

megatron-core warns while it is imported (Transformer Engine / Apex not installed, "No CUDA runtime is found"), and
an entry point whose imports sit at its module top (the RLHF trainers) imports it before its ``main`` can silence
anything. ``megatron_patch.torchrun`` starts every ``-m MODULE`` rank through this module, so each rank is quiet
from its first import, whichever entry point it runs.
"""

from __future__ import annotations

import runpy
import sys

from .noise import quiet_third_party


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m megatron_patch.runtime.rank_main MODULE [ARGS...]")
    quiet_third_party()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]  # what MODULE's argparse reads, as under python -m MODULE
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
