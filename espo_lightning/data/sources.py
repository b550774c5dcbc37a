"""Prompt sources that read local data files (JSON lines, JSON, Parquet, a ``datasets`` folder)."""
from __future__ import annotations

import json
import random
import string
from abc import abstractmethod
from pathlib import Path
from typing import Any

from espo_lightning.data.messages import check_messages, is_conversational, last_user_message
from espo_lightning.data.source import PromptSource

__all__ = ["FilePromptSource", "TablePromptSource"]

ALLOWED_FORMATS = (
    ".jsonl (one JSON object per line), .json (a list of objects, or JSON lines), .parquet, "
    "or a folder written by Hugging Face datasets' save_to_disk"
)


class TablePromptSource(PromptSource):
    """Rows of a table (a data file, a ``datasets`` split) rendered into prompts; subclasses say where
    the records come from (``_records``) and how errors name the table (``where``).

    Each row becomes a dict holding every column plus ``prompt``, the rendered ``prompt_template``.
    Reward functions receive the columns by name, so the gold answers reach ``math_accuracy`` as
    ``answer=``; when ``answer_column`` is not ``"answer"`` its value is also stored under ``answer``
    (replacing a column of that name). The table is read on the first call to ``rows()`` and cached;
    all rows are checked then, before shuffling and ``limit``.

    A prompt column may hold text or, as in TRL's conversational format, a list of
    ``{role, content}`` messages; conversational prompts always go through the chat template, and
    ``prompt_template`` rewrites their last user message (``{prompt}`` is that message's text).
    """

    def __init__(
        self,
        prompt_column: str = "question",
        answer_column: str | None = "answer",
        prompt_template: str = "{prompt}",
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        if not isinstance(prompt_column, str) or not prompt_column:
            raise ValueError(f"prompt_column must be a non-empty column name, got {prompt_column!r}")
        if answer_column is not None and (not isinstance(answer_column, str) or not answer_column):
            raise ValueError(f"answer_column must be a column name or None, got {answer_column!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None (all rows), got {limit!r}")
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise ValueError(f"shuffle_seed must be an integer or None (file order), got {shuffle_seed!r}")
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.prompt_template = prompt_template
        self.limit = limit
        self.shuffle_seed = shuffle_seed
        self._fields = _template_fields(prompt_template)
        self._rows: list[dict] | None = None

    @property
    @abstractmethod
    def where(self) -> str:
        """How error messages name the table (a path, ``name[split]``)."""

    @abstractmethod
    def _records(self) -> list[dict]:
        """Every record of the table, in order."""

    def rows(self) -> list[dict]:
        """All selected rows; read and validated on the first call, cached afterwards."""
        if self._rows is None:
            self._rows = self._load()
        return [dict(row) for row in self._rows]  # copies: callers may add keys without touching the cache

    # ------------------------------------------------------------------------------------------
    def _load(self) -> list[dict]:
        records = self._records()
        if not records:
            raise ValueError(f"{self.where}: the file holds no rows")
        required = [(self.prompt_column, "prompt_column")]
        if self.answer_column is not None:
            required.append((self.answer_column, "answer_column"))
        rows = []
        for number, record in enumerate(records, start=1):
            for column, key in required:
                if record.get(column) is None:
                    problem = "has no column" if column not in record else "has an empty (null) value in column"
                    raise ValueError(
                        f"{self.where}: row {number} {problem} {column!r} ({key}); "
                        f"its columns are {sorted(record)}"
                    )
            prompt = record[self.prompt_column]
            if isinstance(prompt, str) and not prompt.strip():
                raise ValueError(f"{self.where}: row {number} has an empty prompt in column {self.prompt_column!r} "
                                 "(prompt_column)")
            if isinstance(prompt, (list, tuple)):
                problem = check_messages(prompt)
                if problem:
                    raise ValueError(f"{self.where}: row {number}, column {self.prompt_column!r} (prompt_column): "
                                     f"{problem}")
            rows.append(self._render(record, number))
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed).shuffle(rows)
        if self.limit is not None:
            rows = rows[: self.limit]
        return rows

    def _render(self, record: dict, number: int) -> dict:
        prompt = record[self.prompt_column]
        messages = [dict(m) for m in prompt] if is_conversational(prompt) else None
        target = last_user_message(messages) if messages else None
        values = {**record, "prompt": messages[target]["content"] if messages else prompt}
        unknown = sorted(self._fields - set(values))
        if unknown:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} uses field(s) {unknown} that {self.where} row {number} "
                f"does not have; available: {sorted(values)} ('prompt' is the {self.prompt_column!r} column)"
            )
        try:
            text = self.prompt_template.format(**values)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as err:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} cannot be rendered for {self.where} row {number}: {err!r}"
            ) from None
        row = dict(record)
        if messages:
            messages[target]["content"] = text
            row["prompt"] = messages
        else:
            row["prompt"] = text
        if self.answer_column is not None and self.answer_column != "answer":
            row["answer"] = record[self.answer_column]
        return row


class FilePromptSource(TablePromptSource):
    """Prompts from a local data file, one row per prompt (see ``TablePromptSource`` for how rows
    become prompts).

    Args:
        path: data file: .jsonl (one JSON object per line), .json (a list of objects, or JSON lines),
            .parquet, or a folder written by Hugging Face ``datasets``' ``save_to_disk`` (needs the
            ``datasets`` package; a DatasetDict folder with several splits needs the split's
            subfolder). ``~`` is expanded; relative paths start at the working directory.
        prompt_column: column holding the question or problem text (or a list of chat messages).
        answer_column: column holding the gold answer that reward functions check against; every
            row must have it. None for prompts without answers.
        prompt_template: ``str.format`` template of the prompt: ``{prompt}`` is the prompt column,
            every other column is available by its name (``"{question}\\nAnswer in {unit}."``);
            write literal braces as ``{{`` and ``}}`` (``\\boxed{{}}``).
        limit: keep only the first ``limit`` rows (after shuffling when ``shuffle_seed`` is set);
            None keeps all.
        shuffle_seed: shuffle the rows once with this seed before ``limit``; None keeps file order.
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "question",
        answer_column: str | None = "answer",
        prompt_template: str = "{prompt}",
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise ValueError(f"path must be a non-empty file path, got {path!r}")
        super().__init__(prompt_column, answer_column, prompt_template, limit, shuffle_seed)
        self.path = str(path)

    @property
    def where(self) -> str:
        return self.path

    def _records(self) -> list[dict]:
        return _read_records(self.path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, prompt_column={self.prompt_column!r}, "
                f"answer_column={self.answer_column!r}, limit={self.limit}, shuffle_seed={self.shuffle_seed})")


def _template_fields(template: str) -> set[str]:
    """Column names a ``str.format`` template refers to; rejects malformed and positional fields."""
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"prompt_template {template!r} is not a valid str.format template ({err}); "
            "write literal braces as '{{' and '}}'"
        ) from None
    fields = set()
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"prompt_template {template!r} has a positional field '{{{field}}}'; use named fields such as "
                "'{prompt}' or a column name, and write literal braces as '{{' and '}}' (e.g. '\\boxed{{}}')"
            )
        fields.add(root)
    return fields


# ---------------------------------------------------------------------------------------- readers
def _read_records(path: str) -> list[dict]:
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"prompt data {path!r} does not exist (looked at {file.absolute()}); "
                                f"FilePromptSource reads {ALLOWED_FORMATS}")
    if file.is_dir():
        return _read_saved_dataset(file, path)
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(file, path)
    if suffix == ".json":
        return _read_json(file, path)
    if suffix == ".parquet":
        return _read_parquet(file)
    raise ValueError(f"prompt data {path!r} has an unknown file type {suffix or '(no extension)'!r}; "
                     f"FilePromptSource reads {ALLOWED_FORMATS}")


def _read_text(file: Path, path: str) -> str:
    """The file as UTF-8 text; undecodable bytes fail with the line and column they are on."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}: line {line}, column {column} is not UTF-8 (byte 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from None


def _read_json_lines(file: Path, path: str, text: str | None = None) -> list[dict]:
    text = _read_text(file, path) if text is None else text
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {line_number} is not valid JSON ({err.msg}, column {err.colno}): "
                             f"{line[:120]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line_number} holds a JSON {type(record).__name__}, "
                             "not an object with one key per column")
        records.append(record)
    return records


def _read_json(file: Path, path: str) -> list[dict]:
    text = _read_text(file, path)
    if not text.lstrip().startswith("["):
        return _read_json_lines(file, path, text)  # JSON lines saved as .json, or one object
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: item {number} of the JSON list is a {type(record).__name__}, "
                             "not an object with one key per column")
    return data


def _read_parquet(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {file} needs pyarrow: pip install pyarrow") from err
    return pq.read_table(file).to_pylist()


def _read_saved_dataset(folder: Path, path: str) -> list[dict]:
    markers = ("dataset_dict.json", "state.json", "dataset_info.json")
    if not any((folder / name).exists() for name in markers):
        raise ValueError(f"prompt data {path!r} is a folder but not one written by datasets' save_to_disk "
                         f"(it holds none of {list(markers)}); FilePromptSource reads {ALLOWED_FORMATS}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{path!r} is a Hugging Face datasets folder; reading it needs the `datasets` package "
            "(pip install datasets), or export it to .jsonl or .parquet first"
        ) from err
    loaded: Any = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise ValueError(f"{path!r} holds the splits {splits}; point path at one of them, "
                             f"e.g. {str(folder / splits[0])!r}")
        loaded = loaded[splits[0]]
    return loaded.to_list()
