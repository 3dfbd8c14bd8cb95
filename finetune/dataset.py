"""The seed's ``from dataset import QlibDataset``, backed by :class:`kronos.data.windows.WindowDataset`.

Unlike the official class, ``ds[i]`` is window ``i`` (not a random draw from a per-copy RNG, which made
DataLoader workers repeat each other -- Q15); pick an epoch's windows with :class:`WindowSampler`
(``ds.sampler(rank, world_size)`` builds the seed's one: ``n_samples`` draws seeded by ``config.seed``).
Works when run from ``finetune/`` or the repository root, installed or not.
"""

from __future__ import annotations

try:
    import kronos  # noqa: F401
except ImportError:  # a plain checkout without `pip install -e .`: use the package next to this folder
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kronos.config import Config  # noqa: E402
from kronos.data.windows import WindowDataset, WindowSampler, split_target_range  # noqa: E402
from kronos.errors import InputError  # noqa: E402

__all__ = ["QlibDataset", "WindowDataset", "WindowSampler"]


class QlibDataset(WindowDataset):
    """Windows of one processed split (``train``/``val``/``test``) under ``config.dataset_path``.

    ``n_samples`` is the seed's epoch size: ``n_train_iter`` (train) or ``n_val_iter`` (val/test), capped at
    the number of windows like the official dataset.
    """

    def __init__(self, data_type: str = "train", config: Config | None = None, return_index: bool = False) -> None:
        if data_type not in ("train", "val", "test"):
            raise InputError(f"data_type must be 'train', 'val' or 'test', got {data_type!r}")
        self.config = config if config is not None else Config()
        self.data_type = data_type
        from kronos.data.store import load_split

        super().__init__(
            load_split(self.config.dataset_path, data_type),
            lookback=self.config.lookback_window,
            predict=self.config.predict_window,
            clip=self.config.clip,
            feature_list=self.config.feature_list,
            time_feature_list=self.config.time_feature_list,
            return_index=return_index,
            name=data_type,
            target_range=split_target_range(self.config.dataset_path, data_type),
        )
        n_iter = self.config.n_train_iter if data_type == "train" else self.config.n_val_iter
        self.n_samples = min(n_iter, len(self))

    @classmethod
    def from_config(cls, config: Config, split: str, return_index: bool = False) -> QlibDataset:
        return cls(split, config, return_index=return_index)

    def sampler(self, rank: int = 0, world_size: int = 1) -> WindowSampler:
        """The epoch sampler for this split: ``n_samples`` windows per epoch, seeded by ``config.seed``."""
        return WindowSampler(len(self), self.n_samples, self.config.seed, rank=rank, world_size=world_size)
