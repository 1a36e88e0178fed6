"""Entry kept next to the shell wrapper; the implementation is megatron_patch.data.preprocess."""

import sys

from megatron_patch.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
