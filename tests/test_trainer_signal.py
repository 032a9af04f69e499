"""Proof that the trained conditioning carries information (tests/support/trainer_signal.py has the experiment).

After a short training on degraded crops of a real photo labelled by the weight-free `piqe`, the
held-out denoising loss with the true quality vectors must be lower than with the vectors shuffled
among the held-out images. Only the sign is asserted; benchmarks/bench_trainer_signal.py reports the
gap and its spread over seeds.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    from comfyui_iqa_adapter.nodes.train_host import HostBase

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, clip, vae = tiny_checkpoint
    yield HostBase(model, clip, vae)
    torch.set_num_threads(before)


def test_true_quality_vectors_beat_shuffled_ones(base, tmp_path):
    from support import trainer_signal

    result = trainer_signal.run(base, tmp_path, seed=0)
    print(f"held-out loss: true {result['loss_true']:.5f}, shuffled {result['loss_shuffled']:.5f}, "
          f"gap {result['gap']:.5f} ({100 * result['relative_gap']:.2f} %)")
    assert result["label_std"] > 1.0  # the degradations really produce different labels
    assert result["loss_true"] < result["loss_shuffled"]
