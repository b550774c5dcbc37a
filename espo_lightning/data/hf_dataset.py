"""Prompts from ``datasets.load_dataset``: a dataset on the Hugging Face Hub, or a builder (``json``,
``parquet``, ``csv``) over local ``data_files``, as TRL and verl users load their data."""
from __future__ import annotations

from typing import Any

from espo_lightning.data.sources import TablePromptSource

__all__ = ["HFDatasetSource"]


class HFDatasetSource(TablePromptSource):
    """One split of ``datasets.load_dataset(path, name, data_files=..., split=...)``, rendered into
    prompts like ``FilePromptSource``'s rows (prompt column, answer column, template, conversational
    prompts).

    Hub datasets are downloaded into the ``datasets`` cache on the first run; with
    ``HF_DATASETS_OFFLINE=1`` (or no network) the cached copy is used. Under several ranks every
    rank loads the split itself (``datasets`` locks its cache, so they do not download it twice).

    Args:
        path: Hub name (``openai/gsm8k``, ``BytedTsinghua-SIA/DAPO-Math-17k``) or builder name
            (``json``, ``parquet``, ``csv``) or a local folder of data files.
        name: Configuration of the dataset (``main`` for gsm8k); None for the default one.
        split: Split to read (``train``, ``test``, slices such as ``train[:1000]``).
        data_files: Files for a builder: a path, a list of paths, or ``{split: paths}``.
        revision: Git revision of a Hub dataset (a tag or commit, for reproducible runs).
        prompt_column: Column holding the question (text or a list of chat messages).
        answer_column: Column holding the gold answer; None for prompts without answers.
        prompt_template: ``str.format`` template of the prompt (see ``FilePromptSource``).
        limit: Keep only the first ``limit`` rows (after shuffling when ``shuffle_seed`` is set).
        shuffle_seed: Shuffle the rows once with this seed before ``limit``.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        prompt_column: str = "question",
        answer_column: str | None = "answer",
        prompt_template: str = "{prompt}",
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"path must be a dataset name or builder, got {path!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a split name such as 'train', got {split!r}")
        super().__init__(prompt_column, answer_column, prompt_template, limit, shuffle_seed)
        self.path, self.name, self.split = path, name, split
        self.data_files, self.revision = data_files, revision

    @property
    def where(self) -> str:
        config = f"/{self.name}" if self.name else ""
        return f"{self.path}{config}[{self.split}]"

    def _records(self) -> list[dict]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("HFDatasetSource needs the `datasets` package: pip install datasets") from err
        try:
            loaded: Any = datasets.load_dataset(self.path, self.name, split=self.split, data_files=self.data_files,
                                                revision=self.revision)
        except (OSError, ValueError) as err:  # missing files or dataset, no network, bad split
            raise ValueError(f"{self.where}: datasets.load_dataset failed: {_first_line(err)}") from None
        return loaded.to_list()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, name={self.name!r}, split={self.split!r}, "
                f"data_files={self.data_files!r}, prompt_column={self.prompt_column!r}, "
                f"answer_column={self.answer_column!r}, limit={self.limit})")


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
