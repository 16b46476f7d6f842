#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on an H100/H200-class GPU): prints one table of images/s and peak
# memory for SD-Turbo's full-size architecture (random weights), a bare diffusers loop vs `probe run`, and CLIP
# ViT-L/14-architecture embeddings/s. Needs a CUDA build of torch and `pip install -e .`; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run on a GPU machine")'
export PROBE_CACHE="${PROBE_CACHE:-$(mktemp -d)}"
timeout 480 python benchmarks/gpu.py --batch "${BATCH:-16}" --batches "${BATCHES:-16}"
