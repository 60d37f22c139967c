from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from zk0.learn.tiny_vlm import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, VLMShape


def test_directory_loads_with_auto_classes_and_registers_smolvlm_tokens(tiny_vlm_dir):
    config = AutoConfig.from_pretrained(tiny_vlm_dir)
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    tokenizer = processor.tokenizer
    assert config.model_type == "smolvlm"
    assert tokenizer.fake_image_token_id == tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
    assert tokenizer.global_image_token_id == tokenizer.convert_tokens_to_ids(GLOBAL_IMAGE_TOKEN)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert "<row_1_col_1>" in tokenizer.get_vocab()
    assert processor.image_seq_len == VLMShape().image_seq_len
    ids = AutoTokenizer.from_pretrained(tiny_vlm_dir)("pick the red cube\n")["input_ids"]
    assert 0 < len(ids) < len("pick the red cube\n")  # BPE merged something


def test_smolvla_builds_on_it_with_only_the_expert_trainable(tiny_vlm_dir):
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    cfg = SmolVLAConfig(
        vlm_model_name=str(tiny_vlm_dir), load_vlm_weights=False, resize_imgs_with_padding=(64, 64), device="cpu",
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (6,)),
                        "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 48, 64))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
    )
    policy = SmolVLAPolicy(cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in policy.parameters())
    assert total < 1_000_000
    assert trainable and not any(".vlm." in n for n in trainable)
    assert any("lm_expert" in n for n in trainable)
