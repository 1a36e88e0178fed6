"""The HF <-> megatron-core pipelines: ``hf_to_mcore.hf_to_mcore``, ``mcore_to_hf.mcore_to_hf``, ``verify.verify``,
the demo and the CLI in ``__main__``. Layouts, rows and sharding live in ``mapping``; storage in ``checkpoint``; the
model identity in ``models.spec``. This package imports nothing on purpose: ``python -m megatron_patch.convert``
re-imports it in every helper process multiprocessing spawns, and those need no torch.
"""
