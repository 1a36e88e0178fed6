"""megatron-patch: HuggingFace LLMs on megatron-core, and back."""

__version__ = "0.1.0"
