"""`probe rate`: human preference studies (serve one, export its votes, import votes from elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from probe.errors import ProbeError

if TYPE_CHECKING:
    from probe.store.votes import Study, VoteStore

out = Console()
err = Console(stderr=True)


class ServeByDefault(TyperGroup):
    """`probe rate RUN --compare A B` means `probe rate serve RUN ...`: a first word that is not a subcommand
    is the run folder."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own (vendored) click Context
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


rate_app = typer.Typer(
    cls=ServeByDefault, no_args_is_help=True,
    help="Human preference studies: `probe rate RUN --compare SUBJECT BASELINE` draws pairs from the run, serves "
         "a rating page on 127.0.0.1 and prints one link per rater; votes go to RUN/ratings.sqlite and into "
         "`probe report`. `probe rate export` / `probe rate import` move votes out and in.")


def _fail(exc: ProbeError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


@rate_app.command("serve")
def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, e.g. reports/preference/latest.")],
    compare: Annotated[tuple[str, str] | None, typer.Option(
        help="SUBJECT BASELINE: two configurations of the run, MODEL or MODEL@STEPS (e.g. sd-turbo@1 "
             "lcm-lora-sdxl@4).")] = None,
    question: Annotated[list[str] | None, typer.Option(
        help="quality ('Which image is of higher quality?') and/or prompt ('Which image follows the prompt "
             "better?'); repeat for both. Default: quality.")] = None,
    pairs: Annotated[int, typer.Option(min=1, help="Pairs to draw (one per prompt first).")] = 50,
    attention: Annotated[int | None, typer.Option(
        min=0, help="Attention checks (an image against a degraded copy); default a tenth of --pairs, at least 1.")
    ] = None,
    raters: Annotated[int, typer.Option(
        min=0, help="Rater links to make (rater-01 ...), in all; 5 or more give a usable interval.")] = 5,
    rater: Annotated[list[str] | None, typer.Option(help="A named rater link (repeatable).")] = None,
    open_study: Annotated[bool, typer.Option(
        "--open", help="Anyone with the study's address joins by typing a name (no per-rater links).")] = False,
    seed: Annotated[int, typer.Option(help="Seeds the pair draw, task order and sides (recorded).")] = 0,
    study: Annotated[str | None, typer.Option(help="Study name (default SUBJECT-vs-BASELINE).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback warns.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8765,
    include_flagged: Annotated[bool, typer.Option(
        "--include-flagged", help="Also draw pairs with an image a safety detector (nsfw, sd_safety) flagged; the "
                                  "rating page then shows a content warning. Default: such pairs are left out.")
    ] = False,
) -> None:
    """Create (or resume) a study and serve it until Ctrl-C; the same command later resumes it."""
    from probe.analyse.safety import flagged_keys
    from probe.rate.serve import ensure_raters
    from probe.rate.serve import serve as serve_study
    from probe.rate.study import create_study, parse_config
    from probe.store.tables import load_run_tables

    try:
        if compare is None:
            raise ProbeError("--compare SUBJECT BASELINE is required (e.g. --compare sd-turbo@1 lcm-lora-sdxl@4)")
        tables = load_run_tables(run_dir, "probe rate")
        jobs, flagged = tables.jobs, set(flagged_keys(tables.jobs, tables.scores))
        subject, baseline = parse_config(compare[0], jobs), parse_config(compare[1], jobs)
        store, found, created, left_out = create_study(run_dir, jobs, subject, baseline, question or ["quality"],
                                                       pairs, seed, open_study, study, attention, flagged,
                                                       include_flagged)
        links = [] if found.open else ensure_raters(store, found, raters, rater or [])
        _say_started(store, found, created, left_out, flagged, pairs)

        def announce(served: Any) -> None:
            if found.open:
                out.print(f"open study: raters join at {served.url}/", highlight=False, soft_wrap=True)
            for name, link in served.links:
                out.print(f"  {escape(name)}: {link}", highlight=False, soft_wrap=True)
            out.print("serving; Ctrl-C stops (every acknowledged vote is already saved)", highlight=False)

        try:
            serve_study(run_dir, found, links, host, port, announce, flagged)
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then re-raises the signal: a clean stop
            pass
    except ProbeError as exc:
        raise _fail(exc) from None
    out.print("stopped", highlight=False)


def _say_started(store: VoteStore, found: Study, created: bool, left_out: int, flagged: set[str], asked: int) -> None:
    """What the study holds, what it left out (also when resumed: the same run, the same pairs left out), and
    whether raters will see images a safety detector flagged."""
    from probe.rate.study import flagged_shown

    stored = store.pairs(found.id)
    kinds = [p.kind for p in stored]
    n_pairs, n_checks = kinds.count("pair"), kinds.count("attention")
    short = "" if n_pairs >= asked else (f" (only {n_pairs} without a flagged image)" if left_out
                                         else f" (the run has only {n_pairs})")
    verb = "created" if created else "resumed"
    out.print(f"study {escape(found.id)} {verb}: {escape(found.subject)} vs {escape(found.baseline)}, "
              f"{n_pairs} pairs{short} and {n_checks} attention checks x {len(found.questions)} question(s); "
              f"votes in {escape(str(store.path))}", highlight=False, soft_wrap=True)
    if left_out:
        out.print(f"left out {left_out} pair(s) with an image a safety detector flagged: the study's win rates are "
                  "over the other pairs; --include-flagged (a new --study) shows them behind a content warning",
                  highlight=False, soft_wrap=True)
    shown = flagged_shown(stored, flagged)
    if shown:
        out.print(f"[bold yellow]warning:[/] {shown} image(s) of this study were flagged by a safety detector; "
                  "raters see a content warning", highlight=False, soft_wrap=True)


@rate_app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with studies.")],
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="FILE.csv or FILE.parquet (default RUN/votes.csv, or RUN/pairs.csv with --pairs).")] = None,
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    pairs: Annotated[bool, typer.Option("--pairs", help="Write the studies' pairs instead of the votes.")] = False,
) -> None:
    """Write every vote (study, pair, kind, rater, question, choice, chosen and left image keys, times, source)."""
    from probe.rate.exchange import export_pairs, export_votes
    from probe.store.votes import VoteStore

    try:
        store = VoteStore(run_dir)
        if study:
            store.study(study)
        target = out_file or run_dir / ("pairs.csv" if pairs else "votes.csv")
        count = (export_pairs if pairs else export_votes)(store, target, study)
    except ProbeError as exc:
        raise _fail(exc) from None
    out.print(f"{count} {'pairs' if pairs else 'votes'} written to {escape(str(target))}", highlight=False,
              soft_wrap=True)


@rate_app.command("import")
def import_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with the study the votes belong to.")],
    file: Annotated[Path, typer.Argument(help=(
        "CSV or parquet, one vote per row: pair, rater, question, and chosen (the picked image's key) or choice "
        "(left/right) with left (the key shown left); optional study, shown_at, answered_at. `probe rate export` "
        "writes this format, `probe rate export --pairs` lists the pairs and keys."))],
    study: Annotated[str | None, typer.Option(help="The study of rows without a study column.")] = None,
) -> None:
    """Add votes collected elsewhere (e.g. a crowdsourcing platform); every row is checked before any is stored."""
    from probe.rate.exchange import import_votes
    from probe.store.votes import VoteStore

    try:
        store = VoteStore(run_dir)
        if study:
            store.study(study)
        added, present = import_votes(store, file, study)
    except ProbeError as exc:
        raise _fail(exc) from None
    out.print(f"{added} votes added, {present} already present", highlight=False)
