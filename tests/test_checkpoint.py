"""Checkpoint files: written atomically, with the permissions an ordinary file write would give."""

import os
import stat

import torch

from bertkit import BertConfig, BertForSequenceClassification


def test_saved_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=100, num_labels=2))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))
