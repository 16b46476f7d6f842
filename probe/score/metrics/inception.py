"""The FID Inception-v3 feature extractor with clean-fid's "clean" preprocessing, from local weights only.

FID is defined on the pool3 (2048-d) features of the TensorFlow Inception-v3 graph of 2015-12-05
(Heusel et al. 2017); torch-fidelity ports that network and its weights to PyTorch, and we use its network
code rather than re-implementing Inception. Preprocessing follows clean-fid's mode "clean" (Parmar et al.
2022): each RGB channel of the uint8 image is resized to 299x299 by PIL bicubic in float ("F") mode,
without re-quantising, which avoids the aliasing of the legacy TensorFlow/PyTorch resizers. The mode name
is part of the extractor id, so features made with another preprocessing are never mixed in.

No download ever happens here: a missing weights file is a ProbeError that says where to put it, and a file
whose sha256 does not start with the hash prefix in its published name (6726825d) is refused, so random or
truncated weights saved under the right name never produce numbers that look like FID.

`StandInExtractor` is the embedded counterpart of the tiny CLIP: a small conv net with seeded random weights
that takes Inception's place when every model in a run is the tiny one, so FID/KID run offline end to end.
Its id says it is a random stand-in, so its features and statistics are never mixed with Inception's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probe.errors import ProbeError
from probe.score.protocol import ImageItem
from probe.store.hashing import file_sha256

if TYPE_CHECKING:
    from PIL import Image

    from probe.store.features import FeatureCache

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "PROBE_INCEPTION_WEIGHTS"
#: torch-fidelity's release of the converted TF weights (the same file pytorch-fid publishes, hash 6726825d).
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
#: names under `torch.hub.get_dir()/checkpoints/` that torch-fidelity and pytorch-fid download to.
WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
#: the leading hex digits of the file's sha256, carried in its name (torch.hub's `check_hash` convention).
WEIGHTS_SHA256_PREFIX = "6726825d"
CLEAN_SIZE = 299

# torch-fidelity's FeatureExtractorInceptionV3 layers, input to pool3, in its forward's order.
POOL3_LAYERS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)  # fmt: skip


def find_inception_weights() -> Path:
    """The weights file: `$PROBE_INCEPTION_WEIGHTS`, else a known name in the torch hub cache.

    Raises:
        ProbeError: no file found; the message names the folder, the file name, the URL and the offline
            alternative (`features: clip`).
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ProbeError(f"{WEIGHTS_ENV}={env} is not a file (expected the FID Inception weights {WEIGHTS_URL})")
        return path
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ProbeError(
        "FID/KID with features: inception needs the FID Inception-v3 weights, which are not on this machine.\n"
        f"  Download {WEIGHTS_URL}\n"
        f"  and put it at {folder / WEIGHTS_FILES[0]}\n"
        f"  (or anywhere, with {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILES[0]}).\n"
        "  Offline alternative: give the fid/kid metric the arg `features: clip` (Fréchet distance on CLIP "
        "embeddings; not comparable to published FID)."
    )


def check_inception_weights(path: Path, expected_prefix: str = WEIGHTS_SHA256_PREFIX) -> str:
    """The file's sha256 after checking that it starts with `expected_prefix` (hashed once per size and mtime).

    Raises:
        ProbeError: the digest does not match; names the path, the expected prefix and the URL.
    """
    digest = file_sha256(path)
    if not digest.startswith(expected_prefix):
        raise ProbeError(
            f"{path} is not the FID Inception-v3 weights file: its sha256 starts with {digest[:8]}, expected "
            f"{expected_prefix}. Replace it with {WEIGHTS_URL}\n"
            "  (or give the fid/kid metric the arg `features: clip`, which needs no Inception weights)."
        )
    return digest


def clean_resize(image: Image.Image, size: int = CLEAN_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: per-channel PIL bicubic in float mode, clipped to [0, 255], not quantised.

    Returns:
        (size, size, 3) float32 array with values in [0, 255].
    """
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"))
    channels = [
        np.asarray(Image.fromarray(pixels[:, :, c].astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


def load_inception(path: Path, device: str = "cpu") -> Any:
    """torch-fidelity's FeatureExtractorInceptionV3 with the weights at `path`, in eval mode on `device`."""
    import torch

    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ProbeError("features: inception needs torch-fidelity (pip install torch-fidelity)") from exc
    try:
        # torch-fidelity unpickles without restriction; refuse a file that is not a plain state dict first.
        torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProbeError(f"{path} is not the FID Inception-v3 weights file ({first}); expected {WEIGHTS_URL}") from exc
    return net.to(device).eval()


def pool3_features(net: Any, batch: Any) -> Any:
    """Pool3 features of float images (N, 3, 299, 299) in [0, 255], through torch-fidelity's layers.

    torch-fidelity's own forward accepts only uint8 and resizes inside the network; clean-fid's float
    resize happens before, so we run the same layers on the float tensor with the same (x - 128) / 128
    scaling. At 299x299 uint8 input the two agree (tested).
    """
    import torch

    x = (batch.to(next(net.parameters()).dtype) - 128) / 128
    for name in POOL3_LAYERS:
        x = getattr(net, name)(x)
    return torch.flatten(x, 1)


class InceptionExtractor:
    """FID Inception-v3 pool3 features with clean preprocessing, cached per image key."""

    mode = "clean"

    def __init__(
        self,
        weights: Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        expected_sha256_prefix: str | None = WEIGHTS_SHA256_PREFIX,
    ) -> None:
        """Find (or take) the weights and check their sha256; the network itself is loaded on first use.

        Args:
            expected_sha256_prefix: what the weights' sha256 must start with. Only tests pass None (to run
                the architecture with random weights they saved); probe itself always checks.
        """
        self.weights = Path(weights) if weights is not None else find_inception_weights()
        self.device = device
        self.batch_size = batch_size
        if expected_sha256_prefix is None:
            digest = file_sha256(self.weights)
        else:
            digest = check_inception_weights(self.weights, expected_sha256_prefix)
        self.id = f"inception-v3-fid-pool3:sha256-{digest[:16]}:{self.mode}"
        self._net: Any = None

    def embed(self, items: Sequence[ImageItem], cache: FeatureCache) -> np.ndarray:
        """(n, 2048) float32 features of `items`, in order; only uncached images go through the network."""
        keys = [item.key for item in items]
        return cache.get_or_compute(self.id, keys, lambda indices: self._compute([items[i] for i in indices]))

    def _compute(self, items: list[ImageItem]) -> np.ndarray:
        import torch

        if self._net is None:
            logger.info("loading FID Inception-v3 from %s", self.weights)
            self._net = load_inception(self.weights, self.device)
        out = []
        for start in range(0, len(items), self.batch_size):
            pixels = np.stack([clean_resize(item.open()) for item in items[start : start + self.batch_size]])
            batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)
            with torch.inference_mode():
                out.append(pool3_features(self._net, batch).float().cpu().numpy())
        return np.concatenate(out)


#: Fingerprint of the stand-in's construction; bump on any change to its layers, seed or preprocessing.
STAND_IN_REVISION = "v1"
#: Seed its weights are drawn from, so it is the same network on every machine (same torch build).
STAND_IN_SEED = 0
#: Its input side: the tiny model's image size, so a 64x64 image is not resized at all.
STAND_IN_SIZE = 64


def build_stand_in_net() -> Any:
    """Three strided 3x3 convolutions with ReLU and a global average pool: (N, 3, 64, 64) -> (N, 64).

    Random features of a conv net still respond to colour and local structure, so distances between
    visibly different sets are non-zero, which is all a machinery test needs. About 2.5 ms per 64x64 image,
    PNG decoding included, on 2 CPU cores; Inception-v3 at 299x299 took 0.75 s per image there (busy machine).
    """
    import torch
    from torch import nn

    # fork_rng: seed the construction without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAND_IN_SEED)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
    return net.eval()


def _weights_digest(net: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class StandInExtractor:
    """A seeded random-weight stand-in for Inception-v3, used only when every model in the run is `tiny`.

    Like the tiny CLIP, it lets FID/KID run end to end offline in milliseconds; its values measure nothing
    about image quality. The id names it a random stand-in and fingerprints its weights, so its cached
    features and reference statistics can never be taken for Inception's (or another build's).
    """

    mode = f"clean-{STAND_IN_SIZE}"

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self._net = build_stand_in_net()  # moved to `device` on first use: a GPU-less Ray driver only reads its id
        self._moved = False
        digest = _weights_digest(self._net)[:16]
        self.id = f"random-stand-in-for-inception-v3:{STAND_IN_REVISION}:weights-{digest}:{self.mode}"
        logger.warning("fid/kid: the run uses the tiny CLIP (every model is tiny), so features come from %s, seeded "
                       "random weights standing in for Inception-v3: the values test the machinery, not image quality",
                       self.id)

    def embed(self, items: Sequence[ImageItem], cache: FeatureCache) -> np.ndarray:
        """(n, 64) float32 features of `items`, in order; only uncached images go through the network."""
        keys = [item.key for item in items]
        return cache.get_or_compute(self.id, keys, lambda indices: self._compute([items[i] for i in indices]))

    def _compute(self, items: list[ImageItem]) -> np.ndarray:
        import torch

        if not self._moved:
            self._net, self._moved = self._net.to(self.device), True
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            pixels = np.stack([clean_resize(item.open(), STAND_IN_SIZE) for item in chunk])
            batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device) - 128) / 128
            with torch.inference_mode():
                out.append(self._net(batch).float().cpu().numpy())
        return np.concatenate(out)
