"""scripts/demo_training_model.py (the trainable Param2MoE of scripts/train_demo_model.py): the folder it
writes computes the same function in param2moe's engine, and its expert bias follows the aux-loss-free rule."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from demo_training_model import DemoModel  # noqa: E402
from export_demo_model import check_engine_parity, write_checkpoint  # noqa: E402
from train_demo_model import lr_at, model_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _trained_looking(seed: int = 0) -> DemoModel:
    """The tiny preset with weights moved off their initial values (norms, expert biases) so that each
    tensor's role shows in the output."""
    torch.manual_seed(seed)
    model = DemoModel(model_config("tiny", None))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
        model.embed.mul_(10)
        for moe in model.moes():
            moe.expert_bias.copy_(0.05 * torch.randn_like(moe.expert_bias))
    return model


def test_written_folder_matches_the_training_module_in_the_engine(tmp_path):
    model = _trained_looking()
    cfg = model.cfg
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.num_shared_experts and cfg.use_qk_norm
    out = str(tmp_path / "demo")
    write_checkpoint(model, cfg, None, out)  # None: the writer's default tokenizer
    g = torch.Generator().manual_seed(1)
    pieces = [torch.randint(25, cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 17, 64)]
    assert check_engine_parity(model, out, pieces, torch.device("cpu"), limit=1e-4) < 1e-4
    # The parity check can fail: a different bias (other experts chosen) moves the logprobs far past it.
    with torch.no_grad():
        model.moes()[0].expert_bias[:4] += 1.0
    with pytest.raises(AssertionError, match="differ"):
        check_engine_parity(model, out, pieces, torch.device("cpu"), limit=1e-4)


def test_expert_bias_update_moves_load_towards_the_mean():
    model = _trained_looking()
    ids = torch.randint(25, model.cfg.vocab_size, (2, 32))
    model(ids)
    moe = model.moes()[0]
    load, before = moe.load.float(), moe.expert_bias.clone()
    assert load.sum() == 2 * 32 * model.cfg.num_experts_per_tok
    model.update_expert_bias(0.01)
    step = moe.expert_bias - before
    assert torch.allclose(step, 0.01 * torch.sign(load.mean() - load))
    # a buffer, not a parameter: no gradient reaches it, the optimizer never sees it
    assert not any(name.endswith("expert_bias") for name, _ in model.named_parameters())


def test_training_reduces_loss_deterministically():
    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(3)
        model = DemoModel(model_config("tiny", None))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.randint(25, 200, (4, 33), generator=torch.Generator().manual_seed(0))
        losses = []
        for step in range(30):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, 30, 3e-3, 3)
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.update_expert_bias(1e-3)
            losses.append(loss.item())
        return losses, model.moes()[0].expert_bias.clone()

    (a, bias_a), (b, bias_b) = run(), run()
    assert a == b and torch.equal(bias_a, bias_b)
    assert a[-1] < 0.6 * a[0]
    assert bias_a.abs().max() > 0  # the balancing rule ran
