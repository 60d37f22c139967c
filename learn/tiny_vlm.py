"""A tiny, randomly initialised SmolVLM directory: the offline stand-in for SmolVLM2 in tests and demos.

`SmolVLAConfig(vlm_model_name=DIR, load_vlm_weights=False)` reads three things from DIR: the model config
(AutoConfig), the processor (AutoProcessor, whose tokenizer must name SmolVLM's image / fake-image /
global-image tokens) and, for the language step of the pre-processor, the tokenizer (AutoTokenizer).
`write_tiny_vlm` writes all of them with `save_pretrained`, so lerobot (and `lerobot-train`) accept the
directory exactly as they accept the real hub model. Weights are never read from it (load_vlm_weights=False),
so none are written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# SmolVLM's special tokens, in the order the real tokenizer adds them after its byte-level vocabulary.
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
PAD_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
UNK_TOKEN = "<|endoftext|>"
MAX_GRID = 4  # <row_R_col_C> tokens for image splitting up to this many tiles per side

_CORPUS = [
    "pick the red cube and place it in the bin",
    "pick up the cube", "push the block to the left", "stack the blue cube on the green cube",
    "shoulder_pan shoulder_lift elbow_flex wrist_flex wrist_roll gripper",
    "User: Assistant: the robot arm moves the object to the target location.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?-_'\"()[]{}\n",
]


@dataclass(frozen=True)
class VLMShape:
    """Architecture of a SmolVLM; the defaults are the tiny stand-in (~0.3 M params in SmolVLA).

    SmolVLA resizes (with padding) every camera image to image_size x image_size.
    """

    image_size: int = 64
    patch_size: int = 16
    scale_factor: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 512
    rope_theta: float = 10000.0

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


# HuggingFaceTB/SmolVLM2-500M-Video-Instruct's published config values, for full-size random-init benchmarks.
SMOLVLM2_500M = VLMShape(
    image_size=512, patch_size=16, scale_factor=4,
    vision_hidden=768, vision_intermediate=3072, vision_layers=12, vision_heads=12,
    text_hidden=960, text_intermediate=2560, text_layers=32, text_heads=15, text_kv_heads=5, head_dim=64,
    vocab_size=49280, rope_theta=100000.0,
)


def special_tokens() -> list[str]:
    grid = [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    return [UNK_TOKEN, BOS_TOKEN, PAD_TOKEN, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN,
            END_OF_UTTERANCE_TOKEN, "<video>", *grid]


def build_tokenizer(vocab_size: int):
    """Byte-level BPE trained on a small robot-task corpus, with SmolVLM's tokens registered by role."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_UTTERANCE_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "fake_image_token": FAKE_IMAGE_TOKEN,
            "global_image_token": GLOBAL_IMAGE_TOKEN,
            "end_of_utterance_token": END_OF_UTTERANCE_TOKEN,
        },
        model_max_length=512,
    )


def build_config(cfg: VLMShape, tokenizer):
    from transformers import LlamaConfig, SmolVLMConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    text = LlamaConfig(
        vocab_size=max(len(tokenizer), cfg.vocab_size),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=cfg.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = SmolVLMVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    return SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        scale_factor=cfg.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_processor(cfg: VLMShape, tokenizer):
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    size = {"longest_edge": cfg.image_size}
    image_processor = SmolVLMImageProcessor(
        size=size, max_image_size=size, do_image_splitting=False, do_convert_rgb=True
    )
    video_processor = SmolVLMVideoProcessor(size=size, max_image_size=size)
    return SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=cfg.image_seq_len,
    )


def write_tiny_vlm(out_dir: str | Path, cfg: VLMShape | None = None) -> Path:
    """Write config, tokenizer and processor of a SmolVLM of shape `cfg` (default tiny) into out_dir."""
    cfg = cfg or VLMShape()
    if cfg.image_size % (cfg.patch_size * cfg.scale_factor):
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size*scale_factor")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(min(cfg.vocab_size, 512))
    build_config(cfg, tokenizer).save_pretrained(out)
    build_processor(cfg, tokenizer).save_pretrained(out)
    return out


def is_vlm_dir(path: str | Path) -> bool:
    """True when path holds a SmolVLM config with its tokenizer (what SmolVLA needs offline)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "tokenizer.json").is_file()
