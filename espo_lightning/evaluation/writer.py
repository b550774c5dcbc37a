"""What an evaluation leaves in the run folder (rank 0 writes):

- ``<log_dir>/eval_summary.json``: the latest evaluation's metrics per set, with the step, the
  stage (sanity: before the first update; fit; validate), the model path and the checkpoint;
- ``<log_dir>/eval_samples/<set>_step<step>.jsonl``: completions of the evaluation, one JSON object
  per line (set, index, sample, prompt, completion, reward, correct, length, truncated), at most
  ``data.val_samples_per_set`` per set;
- TensorBoard text ``val/<set>/samples`` (``val/samples`` for a single source): the first few of them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def write_samples(folder: Path, set_name: str, step: int, samples: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{set_name}_step{step}.jsonl"
    with open(path, "w") as f:
        for sample in samples:
            f.write(json.dumps(sample, default=str) + "\n")
    return path


def samples_markdown(samples: list[dict]) -> str:
    """Samples as Markdown for TensorBoard: a heading with the verdict and reward, then prompt and
    completion as indented code blocks (which no content can break out of)."""
    blocks = []
    for s in samples:
        reward = "unscored" if s.get("reward") is None else f"{s['reward']:g}"
        verdict = "correct" if s.get("correct") else "wrong"
        blocks.append(f"**problem {s['index']}, sample {s['sample']}** &nbsp; {verdict}, reward {reward}"
                      f"{', truncated' if s.get('truncated') else ''}\n\nprompt:\n\n{_code(s['prompt'])}"
                      f"\n\ncompletion:\n\n{_code(s['completion'])}")
    return "\n\n---\n\n".join(blocks)


def _code(text) -> str:
    lines = str(text).splitlines() or [""]
    return "\n".join("    " + line for line in lines)


def tensorboard_writers(loggers) -> list:
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]
