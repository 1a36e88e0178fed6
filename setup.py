from setuptools import find_packages, setup

setup(
    name="megatron-patch",
    version="0.1.0",
    description="HuggingFace LLMs (llama, qwen, baichuan, bloom) on NVIDIA megatron-core: conversion, training, back",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",  # 0.16.x is the newest release that supports Python 3.11
        "transformers>=4.45",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "numpy",
        "tqdm",
        "tensorboard",
        "tiktoken",
        "psutil",  # megatron-core dist_checkpointing writers need it but do not declare it
        "xxhash>=3",  # checkpoint checksum manifests (XXH3-64: the fastest hash measured, see checkpoint/checksums)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "test": ["pytest>=8", "pytest-timeout", "ruff", "peft"],  # peft: tests load the --lora-only export
        "bench": ["trl>=1.0"],  # toolkits/benchmarks/rlhf_benchmark.py only
    },
)
