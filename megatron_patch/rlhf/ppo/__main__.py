"""``python -m megatron_patch.rlhf.ppo``: the PPO / GRPO / RLOO command line (``loop.main``)."""

import sys

from .loop import main

sys.exit(main())
