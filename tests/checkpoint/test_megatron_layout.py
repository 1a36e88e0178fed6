

def test_model_variant_records_name_the_files_their_owners_write():
    """Training's pre-build tensor check skips checkpoints that are not a plain GPTModel: the list must stay the
    file names the LoRA and reward-model code write."""
    from megatron_patch.checkpoint.megatron import MODEL_VARIANT_RECORDS
    from megatron_patch.layers.lora_config import LORA_META
    from megatron_patch.rlhf.preference.reward_model import REWARD_MARKER

    assert set(MODEL_VARIANT_RECORDS) == {LORA_META, REWARD_MARKER}
