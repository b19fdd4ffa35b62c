"""The start-up run of the LM head and sampling at every row count (`worker/sampling_warm_up.py`):
it touches nothing a step reads. On CPU it runs as on CUDA (the worker calls it on CUDA only)."""

from __future__ import annotations

import torch

from mnemosyne.config import ModelConfig
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.layers.sampler import Sampler
from mnemosyne.models.loader import load_model
from mnemosyne.worker.sampling_warm_up import warm_up_sampling


def test_warm_up_runs_every_row_count_and_changes_nothing(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    model = load_model(model_dir, cfg, TorchReferenceBackend(), "cpu")
    hidden = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    before = model.compute_logits(hidden)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seed_state = torch.random.get_rng_state()
    assert warm_up_sampling(model, Sampler(), 5, torch.device("cpu")) >= 0.0
    assert torch.equal(model.compute_logits(hidden), before)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), seed_state)  # its own generator only
