"""The embedded "tiny" CLIP: built in code with seeded random weights, no download.

It lets every CLIP-based metric (clip_score, cmmd, zero-shot probes) run end to end offline and in
milliseconds, and lets tests compare probe's numbers with torchmetrics' on exactly the same model. Its
embeddings measure nothing about the images: use it to test machinery, never to judge a model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

logger = logging.getLogger(__name__)

#: Fingerprint of the tiny CLIP's construction (configs, seed, tokenizer). Bump on any change that alters its
#: weights or preprocessing, so cached tiny-CLIP features are never reused for a different model.
TINY_CLIP_REVISION = "tiny-clip-v1"
#: Seed the weights are drawn from; fixed so the model is identical on every machine (same torch build).
TINY_CLIP_SEED = 0
IMAGE_SIZE = 32


def _config(vocab_size: int, bos: int, eos: int, pad: int) -> CLIPConfig:
    from transformers import CLIPConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build_tiny_clip() -> tuple[CLIPModel, CLIPProcessor]:
    """Build the tiny CLIP model (float32, eval mode) and its processor; identical on every call.

    The processor pairs the tiny SD tokenizer (real CLIP BPE, 77 tokens) with a CLIPImageProcessor that
    does what OpenAI CLIP does (bicubic resize of the shortest edge, center crop, CLIP mean/std), at 32 px.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from probe.embedded.tiny_sd import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = _config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # fork_rng: seed the construction without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CLIP_SEED)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def save_tiny_clip(folder: str | Path) -> Path:
    """Write the tiny CLIP and its processor with `save_pretrained`, laid out like a hub snapshot.

    Loading that folder takes the same path as a downloaded hub model, so tests can cover it offline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    logger.debug("saved tiny CLIP to %s", folder)
    return folder
