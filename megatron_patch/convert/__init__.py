"""Checkpoint conversion HF <-> megatron-core: layout primitives, mapping rows, one sharding engine, readers/writers.

Entry points: ``hf_to_mcore.hf_to_mcore``, ``mcore_to_hf.mcore_to_hf``, ``verify.verify`` and the CLI in
``__main__``. This package imports nothing on purpose: ``python -m megatron_patch.convert`` re-imports it in every
helper process multiprocessing spawns (dist_checkpointing starts one per rank), and those need no torch.
"""
