"""Entry kept next to the shell wrapper; the implementation is megatron_patch.data.vocab_extension."""

import sys

from megatron_patch.data.vocab_extension import main

if __name__ == "__main__":
    sys.exit(main())
