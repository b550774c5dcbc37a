"""Checkpoint plumbing without a training run: atomic commits of files and folders, where
``--ckpt_path last`` looks, and strict loading that skips only the frozen reference."""
from __future__ import annotations

import pytest
import torch

from espo_lightning.run.checkpointing import RolloutCheckpoint, commit
from espo_lightning.errors import ConfigError


def test_commit_replaces_a_file_in_one_rename(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    final.write_text("old")
    tmp.write_text("new")
    commit(tmp, final)
    assert final.read_text() == "new" and not tmp.exists()


def test_commit_swaps_a_folder_and_leaves_no_old_copy(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    final.mkdir()
    (final / "meta.pt").write_text("old")
    tmp.mkdir()
    (tmp / "meta.pt").write_text("new")
    commit(tmp, final)
    assert (final / "meta.pt").read_text() == "new" and not tmp.exists()
    assert not (tmp_path / "last.ckpt.old").exists()


def test_resume_path_falls_back_to_the_old_folder_of_an_interrupted_swap(tmp_path):
    trainer = type("T", (), {"default_root_dir": str(tmp_path)})()
    callback = RolloutCheckpoint()
    assert callback.resume_path(trainer) is None
    old = tmp_path / "checkpoints" / "last.ckpt.old"
    old.mkdir(parents=True)  # killed between "old aside" and "new in"
    assert callback.resume_path(trainer) == old
    (tmp_path / "checkpoints" / "last.ckpt").mkdir()
    assert callback.resume_path(trainer) == tmp_path / "checkpoints" / "last.ckpt"
    assert RolloutCheckpoint(dirpath=str(tmp_path / "x")).folder(trainer) == tmp_path / "x"


@pytest.mark.parametrize("kwargs, message", [({"every_n_rollouts": -1}, "checkpoint.every_n_rollouts"),
                                             ({"mode": "up"}, "checkpoint.mode")])
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RolloutCheckpoint(**kwargs)


def test_loading_skips_the_reference_and_names_any_other_mismatch(tiny_model_dir):
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(tiny_model_dir, loss=ESPOLoss(beta=0.01))  # a KL term: a frozen reference
    module.configure_model()
    full = module.state_dict()
    assert any(k.startswith("reference.") for k in full)
    saved = {"state_dict": dict(full)}
    module.on_save_checkpoint(saved)
    assert not any(k.startswith("reference.") for k in saved["state_dict"])
    module.on_load_checkpoint(saved)  # nothing but the reference is absent: accepted
    reference_before = {k: v.clone() for k, v in full.items() if k.startswith("reference.")}
    module.load_state_dict(saved["state_dict"], strict=True)  # strict, with the reference skipped
    assert all(torch.equal(module.state_dict()[k], v) for k, v in reference_before.items())

    broken = {k: v for k, v in full.items() if not k.startswith("reference.")}
    del broken[next(k for k in broken if k.startswith("policy."))]
    broken["policy.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"does not match model.model_name_or_path=.*1 missing key\(s\) "
                                          r"\(policy\..*\) and 1 unexpected key\(s\) \(policy\.extra\.weight\)"):
        module.on_load_checkpoint({"state_dict": broken})
