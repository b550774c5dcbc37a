"""Runs a comparison's runs one after another, skipping those already finished.

A run is finished when its folder holds ``compare_run.json`` written after the training process
exited 0, with the same command. A folder without it (a run that was interrupted, or failed) is
cleared and the run started again, so an interrupted comparison continues where it stopped; its
finished runs are not redone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

from espo_lightning.compare.plan import Run

MARKER = "compare_run.json"


class RunFailed(RuntimeError):
    pass


def finished(run: Run) -> bool:
    marker = run.folder / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("command") == run.command[1:]  # the interpreter may differ
    except json.JSONDecodeError:
        return False


def execute(runs: list[Run], log=print) -> None:
    """Run every unfinished run in order; raise ``RunFailed`` naming the run and its log on failure."""
    for i, run in enumerate(runs, 1):
        name = f"[{i}/{len(runs)}] {run.method} seed {run.seed}"
        if finished(run):
            log(f"{name}: finished before, skipped ({run.folder})")
            continue
        if run.folder.exists():
            log(f"{name}: unfinished run folder cleared, starting again")
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True)
        log(f"{name}: training in {run.folder} (log: {run.folder / 'train.log'})")
        start = time.perf_counter()
        with open(run.folder / "train.log", "w") as out:
            code = subprocess.run(run.command, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        if code != 0:
            tail = (run.folder / "train.log").read_text().strip().splitlines()[-1:] or ["(empty log)"]
            raise RunFailed(f"{run.method} seed {run.seed} failed (exit {code}) after {wall:.0f}s: {tail[0]} "
                            f"(full log: {run.folder / 'train.log'})")
        (run.folder / MARKER).write_text(json.dumps({
            "command": run.command[1:], "wall_s": wall, "python": sys.executable,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1))
        log(f"{name}: done in {wall:.0f}s")
