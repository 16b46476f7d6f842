"""Public prompt datasets that suites name instead of committing them: shipped in the package, refreshable.

A suite says `prompts: {dataset: partiprompts, ...}`. The file resolves to a copy pulled with
`probe data pull partiprompts` into the data folder (`PROBE_DATA`, else the platformdirs user data folder)
when one is there, so a user can refresh the prompts from upstream; otherwise to the copy shipped inside the
package (`probe/spec/data/<name>/`, listed in NOTICE), so every shipped suite runs offline on a fresh machine.
The shipped copy is pinned by sha256 and checked whenever it is resolved: a file edited or mangled in the
install (e.g. line endings rewritten) would silently change every prompt list built from it.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from probe.errors import ProbeError, UsageError, suggest
from probe.store.atomic import atomic_write_bytes
from probe.store.hashing import file_sha256

#: package-data folder holding the shipped copies (a plain folder next to this module; see pyproject.toml).
SHIPPED_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Dataset:
    """A named prompt table: where it comes from, its licence, the columns we rely on and the shipped copy."""

    name: str
    filename: str
    url: str
    licence: str
    columns: tuple[str, ...]
    description: str
    #: sha256 of the copy shipped in probe/spec/data/<name>/<filename>; a shipped file that differs is refused.
    sha256: str


DATASETS: dict[str, Dataset] = {
    "partiprompts": Dataset(
        name="partiprompts",
        filename="PartiPrompts.tsv",
        url="https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
        licence="Apache-2.0",
        columns=("Prompt", "Category", "Challenge", "Note"),
        description="PartiPrompts (Yu et al. 2022): 1,632 prompts with Category and Challenge labels",
        # Byte-identical to PartiPrompts.tsv at google-research/parti commit 2c99f66 (2022-06-21).
        sha256="fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",
    ),
}


@dataclass(frozen=True)
class DatasetCopies:
    """Where a dataset's copies are, for `probe data`: the pulled one wins over the shipped one."""

    dataset: Dataset
    #: the copy shipped in the package, or None when this install lacks it.
    shipped: Path | None
    #: the copy `probe data pull` saved into the data folder, or None.
    pulled: Path | None

    @property
    def active(self) -> Path | None:
        """The copy suites read (pulled if present, else shipped), or None when there is none."""
        return self.pulled or self.shipped


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


def pulled_path(name: str) -> Path:
    """Where `probe data pull` saves the dataset's file (it may not exist)."""
    dataset = get_dataset(name)
    return data_dir() / dataset.name / dataset.filename


def shipped_path(name: str) -> Path:
    """Where the package's own copy of the dataset's file is (it may be missing from a broken install)."""
    dataset = get_dataset(name)
    return SHIPPED_DIR / dataset.name / dataset.filename


def verify_shipped(name: str) -> Path:
    """The shipped copy's path after checking its sha256 against the pin (remembered while the file is unchanged).

    Raises:
        ProbeError: the file is missing or its content is not the pinned one; the message names the file.
    """
    dataset, path = get_dataset(name), shipped_path(name)
    if not path.is_file():
        raise ProbeError(f"dataset {name!r}: the shipped copy {path} is missing from this install; reinstall "
                         f"probe, or run `probe data pull {name}` (or point PROBE_DATA at a folder holding it)")
    digest = file_sha256(path)
    if digest != dataset.sha256:
        raise ProbeError(f"dataset {name!r}: the shipped copy {path} has sha256 {digest[:16]}..., expected "
                         f"{dataset.sha256[:16]}... (the file was changed after install); reinstall probe, or run "
                         f"`probe data pull {name}` to use a pulled copy instead")
    return path


def dataset_path(name: str) -> Path:
    """The file a suite naming `name` reads: the pulled copy if present, else the verified shipped copy.

    Raises:
        UsageError: unknown dataset.
        ProbeError: no pulled copy and the shipped copy is missing or fails its sha256 check.
    """
    pulled = pulled_path(name)
    if pulled.is_file():
        return pulled
    return verify_shipped(name)


def dataset_copies(name: str) -> DatasetCopies:
    """Both copies of a dataset, without verifying the shipped one (listing must not fail)."""
    shipped, pulled = shipped_path(name), pulled_path(name)
    return DatasetCopies(get_dataset(name), shipped if shipped.is_file() else None, pulled if pulled.is_file() else None)


def pull(name: str, timeout: float = 60.0) -> Path:
    """Download a dataset's file (needs internet) and check its header; returns its path.

    The pulled copy is not held to the shipped copy's sha256: pulling is how a user takes a newer upstream.
    """
    dataset = get_dataset(name)
    target = pulled_path(name)
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
