"""Data: tokenizers, jsonl -> indexed dataset, pretraining and SFT datasets."""
