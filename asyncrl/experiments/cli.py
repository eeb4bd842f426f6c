"""`asyncrl sweep`: the command-line face of the staleness sweep.

Parses the grid, runs what is not finished (sweep.py), then writes the tables (summary.py) and
plots (plots.py). Must hold no logic beyond wiring and turning errors into messages.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 0,1,4") from None


def _name_list(ctx, param, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--staleness", default="0,1,2,4,8", show_default=True, callback=_int_list,
              help="max_staleness values; K=0 (the synchronous baseline) is always added.")
@click.option("--correction", default="none,decoupled,tis", show_default=True, callback=_name_list,
              help="none: PPO on behaviour log-probs; decoupled: proximal recompute, no IS weight; tis: decoupled + truncated IS.")
@click.option("--seeds", default=3, show_default=True, help="Seeds per (staleness, correction): 0..seeds-1.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory: runs/, summary.md, summary.csv, *.png.")
@click.option("--summary-only", is_flag=True, help="Only rebuild the tables and plots from the runs already in --out.")
def sweep(config_path: str, overrides: tuple[str, ...], staleness: list[int], correction: list[str], seeds: int,
          out: str, summary_only: bool) -> None:
    """Run CONFIG for every (staleness, correction, seed), then tabulate and plot them.

    Resumable: runs that finished before (done.json and every step in metrics.jsonl) are skipped.
    OVERRIDES (key=value) apply to every run, e.g. learner.steps=300.
    """
    try:
        from asyncrl.experiments.plots import write_plots
    except ImportError as exc:
        raise click.ClickException(f"asyncrl sweep draws its plots with matplotlib ({exc}); pip install 'asyncrl[experiments]'") from None
    from asyncrl.experiments.summary import write_summary
    from asyncrl.experiments.sweep import Sweep, run_sweep

    out_dir = Path(out)
    failed = []
    # SIGTERM (a scheduler, `kill`) stops the running run the way Ctrl-C does, instead of orphaning it.
    signal.signal(signal.SIGTERM, _interrupt)
    if not summary_only:
        try:
            grid = Sweep(config_path, out_dir, staleness, correction, seeds, list(overrides))
            results = run_sweep(grid)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: the running run was stopped; rerun the same command to resume", err=True)
            sys.exit(130)
        failed = [r.spec.name for r in results if r.returncode != 0 or not grid.is_done(r.spec)]
    try:
        rows = write_summary(out_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    write_plots(out_dir, rows)
    click.echo((out_dir / "summary.md").read_text())
    click.echo(f"tables and plots in {out_dir}")
    if failed:
        click.echo(f"failed runs (rerun the same command to retry them): {', '.join(failed)}", err=True)
        sys.exit(1)
