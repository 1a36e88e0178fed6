"""Non-invasive additions to megatron-core modules, shared by every family that needs them."""
