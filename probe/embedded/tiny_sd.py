"""The embedded "tiny" Stable Diffusion pipeline: built in code, seeded random weights, no download.

It exercises the whole machinery (tokenizer, text encoder, UNet, VAE, Euler trailing scheduler as SD-Turbo
uses) offline in well under a second per 64x64 image, and is bit-identical on every machine with the same
torch build because every module is constructed under a fixed seed. Its images test the machinery, not a
model: they are coloured noise with some structure, never pictures of the prompt.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

#: Fingerprint of the tiny model's construction (configs, seeds, weight tweaks). Bump on any change that
#: alters its weights or tokenizer, so cached tiny images are not reused for a different model.
TINY_REVISION = "tiny-v1"

#: How many BPE merges of the open_clip vocabulary the tiny tokenizer keeps: enough for common English
#: subwords ("photo", "of", "art") while keeping the embedding table small.
N_MERGES = 1000
SOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (same as open_clip and transformers)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _bpe_file() -> Path:
    """The BPE merge list shipped inside the open-clip-torch wheel (no network)."""
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_tiny_tokenizer(n_merges: int = N_MERGES) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer truncated to the first `n_merges` merges of open_clip's vocabulary.

    Written as vocab.json + merges.txt and loaded through `CLIPTokenizer.from_pretrained`, the same path a
    hub tokenizer takes, so it behaves like SD's tokenizer (77 tokens, start/end tokens, lower-casing).
    """
    from transformers import CLIPTokenizer

    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]  # line 0 is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), SOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory(prefix="probe-tiny-tok-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
        (Path(folder) / "merges.txt").write_text(merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH, local_files_only=True)


def _build_text_encoder(tokenizer: CLIPTokenizer) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _build_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    unet: Any = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,  # as SD 2.x
    )
    unet.eval()
    # With default init the prompt barely changes the image (0.7/255): attention over 77 mostly-padding
    # tokens is near uniform and its output is small. Sharper keys and a larger cross-attention output make
    # the prompt visible (~27/255 mean change), and a larger conv_out makes the step count matter.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_k"):
                module.weight.mul_(30.0)
            elif name.endswith("attn2.to_out.0"):
                module.weight.mul_(20.0)
        unet.conv_out.weight.mul_(4.0)
    return unet


def _build_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 levels -> vae_scale_factor 8, as in SD
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.eval()
    # Random weights decode to muted, low-contrast colour (pixel std ~40/255); a 3x output conv spreads the
    # decoded values over the full [-1, 1] range (std ~75/255) so metrics see varied, saturated inputs.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3.0)
    return vae


def _build_scheduler() -> object:
    from diffusers import EulerDiscreteScheduler

    # SD 2.1's beta schedule with SD-Turbo's trailing timestep spacing.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,  # as SD 2.1 and SD-Turbo ship it (unused by trailing spacing)
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the tiny SD pipeline (float32, CPU); identical weights on every call and every machine."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tiny_tokenizer()
    # fork_rng: seed each module's construction without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text_encoder = _build_text_encoder(tokenizer)
        torch.manual_seed(2)
        unet = _build_unet()
        torch.manual_seed(3)
        vae = _build_vae()
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built tiny pipeline %s", TINY_REVISION)
    return pipe


def tiny_fingerprint(pipe: Any) -> str:
    """sha256 over the tiny pipeline's weights and vocabulary, for the run manifest.

    Two builds on different machines must give the same fingerprint; if not, their tiny images differ.
    """
    digest = hashlib.sha256(TINY_REVISION.encode())
    for name in ("text_encoder", "unet", "vae"):
        state = getattr(pipe, name).state_dict()
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()
