"""The `probe` command line: thin typer commands that call one library function each.

Library errors (ProbeError) become a short message and an exit code, never a traceback. Nothing heavy
(torch, diffusers) is imported until a command needs it, so `--help` and `suites validate` are quick.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probe.errors import ProbeError
from probe.spec.metric_catalog import DEFAULT_CLIP_MODEL

app = typer.Typer(
    help="Evaluate and bias-probe SD-Turbo against its baselines: plan, generate, score, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
suites_app = typer.Typer(help="Check suite files.", no_args_is_help=True)
models_app = typer.Typer(help="Model presets: list them (default) or download one.")
app.add_typer(suites_app, name="suites")
app.add_typer(models_app, name="models")
baseline_app = typer.Typer(help="Baselines that `probe check` compares runs with.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")
data_app = typer.Typer(help="Public prompt datasets suites can name (list them, or download one).")
app.add_typer(data_app, name="data")
from probe.cli.rate import rate_app  # noqa: E402 - the subcommand group lives in its own module

app.add_typer(rate_app, name="rate")

out = Console()
err = Console(stderr=True)


def _fail(exc: ProbeError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(exc.exit_code)


@app.command()
def run(
    suite: Annotated[Path, typer.Argument(help="Suite YAML file, e.g. suites/smoke.yaml.")],
    model: Annotated[str | None, typer.Option(help="Generate every job with this preset instead (e.g. tiny).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Keep the first N prompts of each probe.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Reports root; runs go to OUT/<suite>/<run-id>.")] = Path("reports"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: cuda if available).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 4,
    cache_dir: Annotated[Path | None, typer.Option(help="Image cache (default: $PROBE_CACHE or the user cache).")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new run folder instead of resuming one.")] = False,
    clip_model: Annotated[str | None, typer.Option(help="CLIP for all CLIP metrics: hub id, folder or 'tiny'.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (e.g. of a report that fails).")] = False,
    max_jobs: Annotated[int | None, typer.Option(min=1, help="Most jobs the suite may plan (default 100,000).")] = None,
    score_workers: Annotated[int | None, typer.Option(
        min=0, help="Processes for faces, skin tone and OCR (Ray actors with --executor ray; default: one per core, "
                 "on Ray the cluster's CPUs minus one; 0: in-process).")] = None,
    stream: Annotated[bool, typer.Option(
        "--stream/--no-stream", help="Score each batch as soon as it is written, beside generation.")] = True,
    executor: Annotated[str, typer.Option(
        help="local (this process) or ray (Ray actors, one per GPU; needs pip install 'probe[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="With --executor ray: the cluster to join (HOST:PORT or auto; default: a local Ray).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="With --executor ray: generation actors (default: one per GPU, or per two CPUs).")] = None,
) -> None:
    """Plan, generate what is not cached yet, score and write the report. Resumes interrupted runs."""
    from probe.cli.progress import RichProgress
    from probe.run.driver import RunOptions, run_suite

    options = RunOptions(model_override=model, limit=limit, reports_root=out_dir, device=device, batch_size=batch_size,
                         cache_dir=cache_dir, new_run=new, clip_model=clip_model, debug=debug, max_jobs=max_jobs,
                         score_workers=score_workers, stream_scoring=stream, executor=executor, address=address,
                         workers=workers)
    try:
        summary = run_suite(suite, options, RichProgress(err))  # checks the options and --max-jobs first
    except ProbeError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] finished images are kept; run the same command again to resume.")
        raise typer.Exit(130) from None
    c = summary.counts
    verb = "resumed" if summary.resumed else "run"
    out.print(f"{verb} {summary.run_dir}: planned {c.planned}, generated {c.generated}, cached {c.cached}, "
              f"failed {c.failed} in {summary.wall_seconds:.1f} s", highlight=False, soft_wrap=True)
    if summary.report is not None:
        out.print(f"report: {summary.report}", highlight=False, soft_wrap=True)
    if summary.report_error is not None:
        _report_failed(summary.run_dir, summary.report_error)
    if summary.failures:
        for failure in summary.failures[:20]:
            err.print(f"  failed {failure['model']} {failure['probe']} seed={failure['seed']} "
                      f"steps={failure['steps']}: {failure['error']}", highlight=False, markup=False)
        if len(summary.failures) > 20:
            err.print(f"  ... and {len(summary.failures) - 20} more (see manifest.json)")
        raise typer.Exit(1)
    if summary.report_error is not None:
        raise typer.Exit(1)


def _report_failed(run_dir: Path, why: str) -> None:
    err.print(f"[bold red]error:[/] the report could not be rendered ({escape(why)}); the run's data is complete. "
              f"Retry with `probe report {escape(str(run_dir))}` (--debug shows the traceback).", highlight=False,
              soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, e.g. reports/smoke/latest.")],
    baseline: Annotated[Path | None, typer.Option(help="Another run directory to compare with (deltas).")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report in a browser.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback when rendering fails.")] = False,
) -> None:
    """(Re)render index.html + assets/ inside a run directory from its files alone (no model needed)."""
    from probe.report import build_report

    try:
        path = build_report(run_dir, baseline)
    except ProbeError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if debug:
            raise
        err.print(f"[bold red]error:[/] could not render the report of {escape(str(run_dir))}: "
                  f"{escape(type(exc).__name__)}: {escape(str(exc).splitlines()[0] if str(exc) else '')} "
                  "(--debug shows the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"report: {path}", highlight=False, soft_wrap=True)
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def score(
    images: Annotated[Path, typer.Argument(help="Folder of images made elsewhere.")],
    prompts: Annotated[Path, typer.Option(help="CSV/TSV/JSONL with `file` and `prompt` (+ text, model, seed, steps...).")],
    metrics: Annotated[
        list[str] | None, typer.Option("--metrics", help="Metric (repeat), args as name:key=value; default clip_score.")
    ] = None,
    reference: Annotated[Path | None, typer.Option(help="Folder of reference images for fid/kid/cmmd.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Reports root: OUT/score-<folder>/<run-id>.")] = Path("reports"),
    clip_model: Annotated[str, typer.Option(help="CLIP for all CLIP metrics: hub id, folder or 'tiny'.")] = DEFAULT_CLIP_MODEL,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: cuda if available).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache (default: $PROBE_CACHE or the user cache).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (e.g. of a report that fails).")] = False,
    score_workers: Annotated[int | None, typer.Option(
        min=0, help="Processes for faces, skin tone and OCR (Ray actors with --executor ray; default: one per core, "
                 "on Ray the cluster's CPUs minus one; 0: in-process).")] = None,
    executor: Annotated[str, typer.Option(
        help="local, or ray: faces, skin tone and OCR on Ray actors (the cluster's CPUs minus one).")] = "local",
    address: Annotated[str | None, typer.Option(
        help="With --executor ray: the cluster to join (HOST:PORT or auto; default: a local Ray).")] = None,
) -> None:
    """Score images made elsewhere into a run directory that reports and notebooks read."""
    from probe.cli.progress import RichProgress
    from probe.run.external import ScoreRequest, score_images

    request = ScoreRequest(images=images, prompts=prompts, metrics=tuple(metrics or ["clip_score"]),
                           reference=reference, out=out_dir, clip_model=clip_model, device=device, cache_dir=cache_dir,
                           debug=debug, score_workers=score_workers, executor=executor, address=address)
    progress = RichProgress(err)
    try:
        run_dir, counts = score_images(request, progress)
    except ProbeError as exc:
        raise _fail(exc) from None
    finally:
        progress.finish()
    out.print(f"scored {run_dir}: computed {counts['computed']}, reused {counts['reused']}", highlight=False,
              soft_wrap=True)
    if counts["report"] is not None:
        out.print(f"report: {counts['report']}", highlight=False, soft_wrap=True)
    if counts["report_error"] is not None:
        _report_failed(run_dir, counts["report_error"])
    for failure in counts["failures"][:20]:  # a metric raised on these: no score, the run is not complete
        err.print(f"  failed {failure['model']} {failure['probe']}: {failure['error']}", highlight=False, markup=False)
    if len(counts["failures"]) > 20:
        err.print(f"  ... and {len(counts['failures']) - 20} more (see manifest.json)")
    if counts["report_error"] is not None or counts["failures"]:
        raise typer.Exit(1)


@suites_app.command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(help="Suite YAML files.")],
    max_jobs: Annotated[int | None, typer.Option(min=1, help="Most jobs a suite may plan (default 100,000).")] = None,
) -> None:
    """Check suites without running anything; print the jobs per probe and model."""
    from probe.planning.planner import count_jobs, plan_jobs
    from probe.spec.loader import load_suite

    failed = False
    for file in files:
        try:
            counts = count_jobs(plan_jobs(load_suite(file, max_jobs=max_jobs)))
        except ProbeError as exc:
            err.print(str(exc), highlight=False, markup=False, soft_wrap=True)
            failed = True
            continue
        out.print(f"{file}: ok, {sum(counts.values())} jobs", highlight=False, soft_wrap=True)
        table = Table()
        for column in ("probe", "model", "jobs"):
            table.add_column(column, justify="right" if column == "jobs" else "left")
        for (probe_name, model_label), n in counts.items():
            table.add_row(probe_name, model_label, str(n))
        out.print(table)
    if failed:
        raise typer.Exit(2)


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """List presets with hub ids, revisions and whether their weights are in the local cache."""
    if ctx.invoked_subcommand is not None:
        return
    from probe.generate.loading import is_cached
    from probe.spec.presets import PRESETS

    try:
        presets = list(PRESETS.values())  # reads installed packages' probe.presets entry points
    except ProbeError as exc:
        raise _fail(exc) from None
    for preset in presets:
        cached = "yes" if is_cached(preset) else "no"
        out.print(f"[bold]{preset.name}[/] ({preset.role}) cached: {cached}", highlight=False)
        pinned = f" @ {preset.revision}" if preset.revision else ""
        out.print(f"  hub id: {escape(preset.model_id)}{pinned}", highlight=False, soft_wrap=True)
        if preset.lora_id:
            out.print(f"  LoRA: {escape(preset.lora_id)} @ {preset.lora_revision}", highlight=False, soft_wrap=True)
        out.print(f"  defaults: {preset.size[0]}x{preset.size[1]}, steps {list(preset.steps)}, guidance "
                  f"{preset.guidance}" + (f", {preset.scheduler}" if preset.scheduler else ""), highlight=False)


@models_app.command("pull")
def pull(name: Annotated[str, typer.Argument(help="Preset name, e.g. sd-turbo.")]) -> None:
    """Download a preset's weights into the Hugging Face cache (needs internet)."""
    from probe.generate.loading import pull as pull_preset
    from probe.spec.presets import get_preset

    try:
        path = pull_preset(get_preset(name))  # wraps every download failure in a ProbeError
    except ProbeError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] files already downloaded are kept; run the same command to go on.")
        raise typer.Exit(130) from None
    out.print(f"{name}: cached at {path}", highlight=False, soft_wrap=True)


@baseline_app.command("save")
def baseline_save(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, e.g. reports/quality/latest.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Baseline JSON to write.")],
    allow_incomplete: Annotated[bool, typer.Option(
        "--allow-incomplete", help="Save a run that did not finish (refused without it); the file records its "
        "status, so `probe check` refuses it in turn unless given --allow-incomplete too.")] = False,
) -> None:
    """Save a run's per-image scores, set metrics and aggregates as a baseline file."""
    from probe.gate.baseline import save_baseline

    try:
        baseline = save_baseline(run_dir, output, allow_incomplete=allow_incomplete)
    except ProbeError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        err.print(f"[bold red]error:[/] cannot write {escape(str(output))}: {escape(exc.strerror or str(exc))}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for warning in baseline.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)} (--allow-incomplete)", highlight=False, soft_wrap=True)
    out.print(f"saved {len(baseline.per_image)} per-image and {len(baseline.sets)} set scores to {output}",
              highlight=False, soft_wrap=True)


@app.command()
def check(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to gate.")],
    baseline: Annotated[Path | None, typer.Option(help="Baseline JSON (probe baseline save) or run directory.")] = None,
    rule: Annotated[list[str] | None, typer.Option(help=(
        "Extra rule, e.g. clip_score:probe=p,max_drop=0.5 or "
        "pickscore:model=sd-turbo,against=lcm-lora-sdxl,min_win_rate=0.5 (repeat)."))] = None,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here (one test case per rule).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown summary here (CI job summary).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON verdict here.")] = None,
    allow_inconclusive: Annotated[bool, typer.Option(
        "--allow-inconclusive", help="Pass groups with nothing to judge (no values, all labels unknown, no CI).")] = False,
    allow_incomplete: Annotated[bool, typer.Option(
        "--allow-incomplete", help="Gate a run (or baseline) that did not finish: jobs failed or missing, scores "
        "missing, status not 'complete'. Refused (exit 2) without it; with it, a warning on stderr.")] = False,
) -> None:
    """Gate CI on the suite's `checks:` and --rule: exit 0 pass, 1 regression or inconclusive, 2 misuse."""
    from probe.gate.inputs import check_inputs
    from probe.gate.output import write_json, write_junit, write_markdown
    from probe.gate.rules import evaluate

    try:
        inputs = check_inputs(run_dir, baseline, rule, allow_incomplete=allow_incomplete)
        verdict = evaluate(inputs.run, inputs.baseline, inputs.rules, allow_inconclusive=allow_inconclusive)
    except ProbeError as exc:
        raise _fail(exc) from None
    verdict.warnings.extend(inputs.warnings)
    for warning in inputs.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)} (--allow-incomplete)", highlight=False, soft_wrap=True)
    _print_verdict(verdict)
    for path, write in ((junit, write_junit), (markdown, write_markdown), (json_out, write_json)):
        if path is not None:
            try:
                write(verdict, path)
            except OSError as exc:
                err.print(f"[bold red]error:[/] cannot write {escape(str(path))}: {escape(exc.strerror or str(exc))}",
                          highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
    raise typer.Exit(0 if verdict.passed else 1)


def _print_verdict(verdict: object) -> None:
    from probe.gate.verdict import Verdict

    assert isinstance(verdict, Verdict)
    title = "[green]passed[/]" if verdict.passed else "[red]regression[/]"
    if verdict.inconclusive:
        allowed = " (allowed)" if verdict.allow_inconclusive else "; --allow-inconclusive passes them"
        title += f", {verdict.inconclusive} inconclusive{allowed}"
    table = Table(title="probe check: " + title, title_justify="left")
    for column in ("rule", "group", "result", "detail"):
        table.add_column(column, overflow="fold")
    shown = {"pass": "pass", "fail": "[bold red]FAIL[/]", "inconclusive": "[yellow]INCONCLUSIVE[/]"}
    for o in verdict.outcomes:
        group = " ".join(f"{k}={v}" for k, v in o.group.items() if v is not None)
        table.add_row(escape(o.rule), escape(group), shown[o.status], escape(o.detail))
    out.print(table)


@data_app.callback(invoke_without_command=True)
def data(ctx: typer.Context) -> None:
    """List the datasets, their licences, the shipped and pulled copies, and which one suites use."""
    if ctx.invoked_subcommand is not None:
        return
    from probe.spec.datasets import DATASETS, dataset_copies

    table = Table()
    for column in ("dataset", "licence", "description", "shipped", "pulled", "used"):
        table.add_column(column, overflow="fold")
    for name in DATASETS:
        copies = dataset_copies(name)
        used = "pulled" if copies.pulled else "shipped" if copies.shipped else "none"
        table.add_row(name, copies.dataset.licence, copies.dataset.description, escape(str(copies.shipped or "no")),
                      escape(str(copies.pulled or "no")), used)
    out.print(table)


@data_app.command("pull")
def data_pull(name: Annotated[str, typer.Argument(help="Dataset name, e.g. partiprompts.")]) -> None:
    """Download a dataset into the data folder (needs internet); the pulled copy then wins over the shipped one."""
    from probe.spec.datasets import pull as pull_dataset

    try:
        path = pull_dataset(name)
    except ProbeError as exc:
        raise _fail(exc) from None
    out.print(f"{name}: saved to {path} (used instead of the shipped copy from now on)")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
