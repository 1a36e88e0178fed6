"""Data: tokenizers, jsonl -> indexed dataset, pretraining, SFT and preference-pair datasets."""
