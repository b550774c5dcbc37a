"""The DataLoaders the rollout DataModule hands Lightning."""
from __future__ import annotations

import warnings

from torch.utils.data import DataLoader, IterableDataset

# Items defines __len__ on purpose (progress bar, epoch length) and is never split across workers.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


class Items(IterableDataset):
    """A fixed list served in order, from ``start`` on (a resumed rollout skips what was trained
    on; its length stays the whole list's, as Lightning counts the skipped batches as done).
    Iterable, so Lightning adds no DistributedSampler: the sharding is ours (by prompt group for
    training, by row for validation)."""

    def __init__(self, items: list, start: int = 0):
        self.items, self.start = items, start

    def __iter__(self):
        return iter(self.items[self.start:])

    def __len__(self) -> int:
        return len(self.items)


class RolloutLoader(DataLoader):
    """The rollout's minibatches. Its position lives in the DataModule's checkpoint state; the
    (empty) state_dict tells Lightning the loader resumes where it was, which it does."""

    def __init__(self, items: list, start: int = 0):
        super().__init__(Items(items, start), batch_size=None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
