"""Compare methods the way the ESPO paper does: every (method, seed) trained in turn, then a report.

    python -m espo_lightning.compare --config conf/compare.yaml --out runs/compare
    python -m espo_lightning.compare --config conf/compare.yaml --out runs/compare --report-only

Runs go to ``OUT/runs/METHOD/seedS`` (a run folder each, TensorBoard logs inside); finished runs are
skipped, so an interrupted comparison continues where it stopped. Then ``report.md`` and its PNG
figures (in ``OUT``, or ``--report-dir``) are written from the run folders alone: validation accuracy and reward with a band over
seeds, clip fractions, ESPO's entropy against its clip fraction, gradient utilisation, response
length, time per step, and a table of final accuracy and time to the target accuracy."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from espo_lightning.compare import figures, report
from espo_lightning.compare.curves import load_run
from espo_lightning.compare.plan import load_plan
from espo_lightning.compare.runner import MARKER, RunFailed, execute, finished
from espo_lightning.errors import ConfigError
from espo_lightning.plots import NoEventsError


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("events.out.tfevents*"))


def _log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m espo_lightning.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the comparison file (see conf/compare.yaml)")
    parser.add_argument("--out", required=True, help="folder for the run folders, report.md and its figures")
    parser.add_argument("--report-dir", help="folder for report.md and its figures (default: --out), e.g. docs/compare "
                        "to keep the report apart from the run folders")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: redo report.md and the figures from the run folders in --out (also "
                             "runs trained outside this command, e.g. the --dry-run commands on a cluster)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's training command and stop")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
        out = Path(args.out)
        runs = plan.runs(out)
        if args.dry_run:
            for run in runs:
                print(("# finished: " if finished(run) else "") + shlex.join(run.command))
            return out
        if not args.report_only:
            execute(runs, log=_log)
        # --report-only also takes run folders trained outside this command (e.g. the --dry-run
        # commands launched on a cluster), which have logs but no marker; the report names them.
        unmarked = [r for r in runs if args.report_only and not finished(r) and has_events(r.folder)]
        done = [r for r in runs if finished(r) or r in unmarked]
        if not done:
            raise ConfigError(f"--out {out}: no finished runs of this comparison to report on")
        for run in runs:
            if run not in done:
                _log(f"{run.method} seed {run.seed}: not finished, left out of the report")
            elif run in unmarked:
                _log(f"{run.method} seed {run.seed}: no {MARKER} (trained elsewhere or interrupted); reported as found")
        groups: dict = {}
        for run in done:
            groups.setdefault(run.method, []).append(load_run(run.folder, run.method, run.seed))
        report_dir = Path(args.report_dir) if args.report_dir else out
        written = figures.render(report_dir, groups, plan.smooth)
        # The command that trains and reports; a --report-only redo says so beside it.
        command = "python -m espo_lightning.compare " + shlex.join([a for a in argv if a != "--report-only"])
        path = report.write(report_dir, plan, groups, written, command, redone=args.report_only,
                            unmarked=[f"{r.method} seed {r.seed}" for r in unmarked])
    except (ConfigError, RunFailed, NoEventsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    _log(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
