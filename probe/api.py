"""The Python API researchers import: load a run directory into pandas and look at it.

    from probe import load_run
    run = load_run("reports/smoke/latest")
    run.summary()                      # the report's numbers: means with 95% CIs per probe/model/steps
    run.frame()                        # one row per image, one column per metric

Reads files only; nothing here imports torch.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from probe.analyse.aggregate import GRID, aggregate, paired_deltas, per_image, with_series
from probe.analyse.pairing import pair
from probe.errors import UsageError
from probe.spec.metric_catalog import is_binary
from probe.stats.proportion import delta_estimate, mean_estimate
from probe.store.tables import read_derived

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from probe.analyse.human import HumanResults


class Run:
    """A run directory (`probe run` or `probe score` output), loaded lazily table by table."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """manifest.json: resolved suite, presets, packages, device, counts, metric configurations."""
        from probe.store.reading import read_json

        manifest = read_json(self.path / "manifest.json", "run")  # a torn or non-JSON file: one clear error
        if not isinstance(manifest, dict):
            raise UsageError(f"run {self.path / 'manifest.json'}: not a run manifest (a JSON {type(manifest).__name__})")
        return manifest

    @cached_property
    def jobs(self) -> pd.DataFrame:
        """jobs.parquet: one row per planned job (key, probe, model, prompt, var_*, attr_*, seed, steps, ...)."""
        from probe.store.reading import read_table

        return read_table(self.path / "jobs.parquet", "run")

    @cached_property
    def scores(self) -> pd.DataFrame:
        """scores.parquet in long format (empty when the run listed no metrics)."""
        from probe.store.tables import read_scores

        return read_scores(self.path)

    @property
    def subject(self) -> str:
        """The subject model's label (the suite's first model)."""
        from probe.store.tables import run_models

        return run_models(self.manifest, self.jobs)[0]

    def frame(self) -> pd.DataFrame:
        """Jobs joined with per-image scores: one row per image, one column per series (and `<series>_label`)."""
        long = per_image(self.jobs, self.scores)
        jobs = self.jobs[self.jobs["image"].notna()].drop_duplicates(["probe", "model", "key"])
        if long.empty:
            return jobs.reset_index(drop=True)
        index = ["probe", "model", "key"]
        values = long.pivot_table(index=index, columns="series", values="value", aggfunc="first")
        labels = long[long["label"].notna()].pivot_table(index=index, columns="series", values="label", aggfunc="first")
        labels.columns = [f"{c}_label" for c in labels.columns]
        wide = values.join(labels, how="outer") if not labels.empty else values
        return jobs.merge(wide.reset_index(), on=index, how="left").reset_index(drop=True)

    def summary(self, by: list[str] | None = None) -> pd.DataFrame:
        """Means with 95% CIs clustered by prompt (bootstrap; Korn-Graubard for 0/1 outputs) and n_prompts / n_images.

        With the default grouping (probe, model, steps, strength) this is aggregates.parquet: the numbers the
        report shows. `by` groups per-image metrics by any job columns instead, e.g. ["model", "var_occupation"].
        """
        if by is None:
            stored = read_derived(self.path / "aggregates.parquet")  # None when missing or torn: recomputed
            return with_series(stored) if stored is not None else aggregate(self.jobs, self.scores)
        frame = per_image(self.jobs, self.scores)
        frame = frame[frame["value"].notna()]
        rows = []
        for coords, group in frame.groupby([*by, "series"], dropna=False, sort=True):
            est = mean_estimate(group["value"].to_numpy(), group["prompt"].to_numpy(),
                                binary=is_binary(str(group["metric"].iloc[0])))
            rows.append({**dict(zip([*by, "series"], coords, strict=True)), "metric": group["metric"].iloc[0],
                         "mean": est.mean, "low": est.low,
                         "high": est.high, "n_prompts": est.n_clusters, "n_images": est.n})
        return pd.DataFrame(rows)

    def deltas(self) -> pd.DataFrame:
        """The subject minus each baseline, paired by `probe.analyse.pairing.ITEM`, with CIs."""
        stored = read_derived(self.path / "deltas.parquet")
        return with_series(stored) if stored is not None else paired_deltas(self.jobs, self.scores,
                                                                                          self.subject)

    def win_rates(self) -> pd.DataFrame:
        """Every configuration's win rate against every other per directional metric (preference.parquet)."""
        return self._preference()[0]

    def elo(self) -> pd.DataFrame:
        """Bradley-Terry Elo of every configuration per directional metric, with CIs (elo.parquet)."""
        return self._preference()[1]

    def human(self, min_attention: float = 0.8) -> HumanResults | None:
        """The votes of the run's `probe rate` studies and what they say (win rates, Elo, agreement, attention,
        metric agreement); None when the run has no studies."""
        from probe.analyse.human import load_human

        return load_human(self.path, self.jobs, self.scores, min_attention)

    def _preference(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        from probe.analyse.preference import stored_or_computed

        return stored_or_computed(self.path, self.jobs, self.scores)

    def image_path(self, key: str) -> Path:
        """Where the image for a job key lives in this run folder."""
        rows = self.jobs.loc[(self.jobs["key"] == key) & self.jobs["image"].notna(), "image"]
        if rows.empty:
            raise UsageError(f"no image with key {key!r} in {self.path}")
        return self.path / str(rows.iloc[0])

    def image(self, key: str) -> Image.Image:
        """The image for a job key, as RGB."""
        from PIL import Image

        with Image.open(self.image_path(key)) as image:
            return image.convert("RGB")

    def grid(self, seed: int | None = None, max_rows: int = 8, **filters: Any) -> Figure:
        """Images as a matplotlib figure: prompt rows x (model, steps, strength) columns at one seed.

        Filters are job columns, e.g. `run.grid(probe="occupations", seed=0)`.
        """
        import matplotlib.pyplot as plt

        jobs = self.jobs[self.jobs["image"].notna()]
        for column, value in filters.items():
            jobs = jobs[jobs[column] == value]
        seed = int(jobs["seed"].min()) if seed is None and not jobs.empty else seed
        jobs = jobs[jobs["seed"] == seed]
        prompts = list(dict.fromkeys(jobs["prompt"]))[:max_rows]
        strengths = [None if pd.isna(v) else float(v) for v in jobs["strength"]]  # NaN != NaN would not dedupe
        columns = list(dict.fromkeys(zip(jobs["model"], jobs["steps"], strengths, strict=True)))
        fig, axes = plt.subplots(max(1, len(prompts)), max(1, len(columns)), squeeze=False,
                                 figsize=(1.8 * max(1, len(columns)), 1.8 * max(1, len(prompts))))
        for ax in axes.flat:
            ax.axis("off")
        for r, prompt in enumerate(prompts):
            for c, (model, steps, strength) in enumerate(columns):
                same_strength = jobs["strength"].isna() if strength is None else jobs["strength"] == strength
                hit = jobs[(jobs["prompt"] == prompt) & (jobs["model"] == model) & (jobs["steps"] == steps)
                           & same_strength]
                if not hit.empty:
                    axes[r][c].imshow(self.image(hit["key"].iloc[0]))
                if r == 0:
                    label = f"{model}\n{steps} steps" + ("" if strength is None else f"\nstrength {strength}")
                    axes[r][c].set_title(label, fontsize=7)
            axes[r][0].text(-0.05, 0.5, prompt[:40], transform=axes[r][0].transAxes, ha="right", va="center",
                            fontsize=7)
        fig.suptitle(f"seed {seed}", fontsize=8)
        fig.subplots_adjust(left=0.3)
        return fig


def load_run(path: str | Path) -> Run:
    """Open a run directory (or `reports/<suite>/latest`)."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise UsageError(f"{path} is not a run directory (no manifest.json)")
    from probe.store.tables import check_schema

    run = Run(path)
    check_schema(run.manifest, path)
    return run


def compare(run_a: Run | str | Path, run_b: Run | str | Path) -> pd.DataFrame:
    """Per-image metrics of run_b minus run_a, paired by model, steps and `probe.analyse.pairing.ITEM`.

    For "what changed between two versions of a model or of the library": one row per probe x model x steps x
    strength x metric with the mean change, its 95% CI (clustered by prompt) and the number of pairs.
    """
    a = run_a if isinstance(run_a, Run) else load_run(run_a)
    b = run_b if isinstance(run_b, Run) else load_run(run_b)
    left = per_image(a.jobs, a.scores)
    right = per_image(b.jobs, b.scores)
    merged = pair(left, right, extra=["model", "steps", "series", "metric"], suffixes=("_a", "_b"))
    merged = merged[merged["value_a"].notna() & merged["value_b"].notna()]
    rows = []
    for coords, group in merged.groupby([*GRID, "series", "metric"], dropna=False, sort=True):
        est = delta_estimate(group["value_b"].to_numpy(), group["value_a"].to_numpy(), group["prompt"].to_numpy(),
                             binary=is_binary(str(coords[-1])))
        rows.append({**dict(zip([*GRID, "series", "metric"], coords, strict=True)), "mean_a": group["value_a"].mean(),
                     "mean_b": group["value_b"].mean(), "delta": est.mean, "low": est.low, "high": est.high,
                     "n_pairs": est.n, "n_prompts": est.n_clusters})
    return pd.DataFrame(rows)
