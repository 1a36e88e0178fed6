"""megatron-patch: HuggingFace LLMs on megatron-core, and back."""

import sys

__version__ = "0.1.0"


def _ctrl_c_in_one_line(previous):
    """Ctrl-C while an entry point is still importing (megatron-core and torch take seconds): one line, as the entry
    points print it once running (errors.run_reporting_errors), not a traceback through importlib."""

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            return
        previous(kind, value, traceback)

    return hook


if sys.excepthook is sys.__excepthook__:  # not where IPython or another tool has its own hook
    sys.excepthook = _ctrl_c_in_one_line(sys.__excepthook__)
