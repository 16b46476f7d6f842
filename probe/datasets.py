"""Public prompt datasets that suites name instead of committing them: fetched once into the user data dir.

`probe data pull partiprompts` downloads the file; a suite then says `prompts: {dataset: partiprompts, ...}`.
`PROBE_DATA` overrides the folder (tests point it at a local copy).
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from probe.errors import ProbeError, UsageError, suggest
from probe.store import atomic_write_bytes


@dataclass(frozen=True)
class Dataset:
    """A named prompt table: where it comes from, its licence and the columns we rely on."""

    name: str
    filename: str
    url: str
    licence: str
    columns: tuple[str, ...]
    description: str


DATASETS: dict[str, Dataset] = {
    "partiprompts": Dataset(
        name="partiprompts",
        filename="PartiPrompts.tsv",
        url="https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
        licence="Apache-2.0",
        columns=("Prompt", "Category", "Challenge", "Note"),
        description="PartiPrompts (Yu et al. 2022): 1,632 prompts with Category and Challenge labels",
    ),
}


def data_dir() -> Path:
    """`PROBE_DATA` if set, else the user data folder (e.g. ~/.local/share/probe)."""
    env = os.environ.get("PROBE_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("probe"))


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}{suggest(name, DATASETS)}") from None


def dataset_path(name: str) -> Path:
    """Where the dataset's file lives once pulled (it may not exist yet)."""
    dataset = get_dataset(name)
    return data_dir() / dataset.name / dataset.filename


def pull(name: str, timeout: float = 60.0) -> Path:
    """Download a dataset's file (needs internet) and check its header; returns its path."""
    dataset = get_dataset(name)
    target = dataset_path(name)
    try:
        with urllib.request.urlopen(dataset.url, timeout=timeout) as response:  # noqa: S310 - fixed https URL
            data = response.read()
    except OSError as exc:
        raise ProbeError(f"could not download {dataset.name} from {dataset.url}: {exc}. "
                         f"Copy the file to {target} by hand instead.") from None
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r").split("\t")
    missing = [c for c in dataset.columns if c not in header]
    if missing:
        raise ProbeError(f"{dataset.url} does not look like {dataset.name}: no column {missing[0]!r}")
    atomic_write_bytes(target, data)
    return target
