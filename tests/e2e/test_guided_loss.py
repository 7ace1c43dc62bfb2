"""How the trainer treats guided rollouts, on crafted batches: the gradient of the whole loss with respect to each
completion token's log-prob (taken from the policy-gradient forward) is compared with the formula of each role.

TRL's ``dapo`` loss with π_old = π_θ gives every ordinary token −A / N (N = tokens in the normaliser). Then:
``context`` and unguided rows: −A / N, unchanged; ``swap`` rows: −A · r γ / (r + γ)² / N (the derivative of
r / (r + γ), r = π_θ(y | x) / π_old(y | x, h)); masked prefix tokens: 0, and out of N; supervised prefix tokens:
−A · π γ / (π + γ)² / N, and in N.
"""

import pytest
import torch
from helpers.tiny import trainer

from opd_plugins.samplers.base import ROLES
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components

B, P, T = 4, 3, 5
ADV = torch.tensor([1.0, -1.0, 0.5, 2.0])


def _batch(tokenizer, **extra):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, len(tokenizer), (B, n), generator=g)  # noqa: E731
    batch = {"prompt_ids": ids(P), "prompt_mask": torch.ones(B, P, dtype=torch.long), "completion_ids": ids(T),
             "completion_mask": torch.ones(B, T, dtype=torch.long), "advantages": ADV.clone()}
    batch.update(extra)
    loss_mask = batch["completion_mask"] * batch.get("tool_mask", torch.ones(B, T, dtype=torch.long))
    batch["num_items_in_batch"] = (loss_mask.float() + batch.get("prefix_supervised_mask", torch.zeros(B, T))).sum()
    return batch


def _token_gradient(tr, batch):
    """d loss / d log π(y_t) for every completion token, through the policy-gradient forward."""
    seen = []
    original = tr._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if torch.is_grad_enabled():
            seen.append(out[0])
        return out

    tr._get_per_token_logps_and_entropies = spy
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by TRL's training loop
    loss = tr._compute_loss(tr.model, batch)
    logps = seen[0]
    (grad,) = torch.autograd.grad(loss, logps)
    return grad, logps.detach()


@pytest.fixture
def tr(tmp_path, opd_tokenizer):
    comps = Components.build(pg_weight=1.0, sampler=("guide", {"gamma": "constant", "gamma_value": 0.5}))
    return trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                   max_steps=1, gradient_accumulation_steps=1, steps_per_generation=1)


def test_unguided_and_context_rows_get_the_plain_policy_gradient(tr, opd_tokenizer):
    plain, _ = _token_gradient(tr, _batch(opd_tokenizer))
    N = B * T
    assert torch.allclose(plain, (-ADV / N).unsqueeze(1).expand(B, T), atol=1e-6)
    roles = torch.tensor([ROLES.index("context")] * B)
    context, _ = _token_gradient(tr, _batch(opd_tokenizer, sampler_role=roles))
    assert torch.allclose(context, plain, atol=1e-7)


def test_swap_rows_follow_the_shaped_ratio(tr, opd_tokenizer):
    roles = torch.tensor([ROLES.index("swap"), ROLES.index("none"), ROLES.index("swap"), ROLES.index("none")])
    g = torch.Generator().manual_seed(1)
    behaviour = -torch.rand(B, T, generator=g) * 3  # log π_old(y | x, h), made up
    grad, logps = _token_gradient(tr, _batch(opd_tokenizer, sampler_role=roles, swap_behaviour_logps=behaviour))
    N, gamma = B * T, 0.5
    r = torch.exp(logps - behaviour)
    expected = (-ADV / N).unsqueeze(1).expand(B, T).clone()
    swap = roles == ROLES.index("swap")
    expected[swap] = (-ADV[swap].unsqueeze(1) * r[swap] * gamma / (r[swap] + gamma) ** 2) / N
    assert torch.allclose(grad, expected, atol=1e-6)


def test_masked_prefix_tokens_get_no_gradient_and_leave_the_normaliser(tr, opd_tokenizer):
    tool_mask = torch.ones(B, T, dtype=torch.long)
    tool_mask[1, :2] = 0  # a forced prefix of 2 tokens on row 1
    roles = torch.tensor([0, ROLES.index("prefix"), 0, 0])
    batch = _batch(opd_tokenizer, sampler_role=roles, tool_mask=tool_mask)
    assert float(batch["num_items_in_batch"]) == B * T - 2
    grad, _ = _token_gradient(tr, batch)
    N = B * T - 2
    expected = (-ADV / N).unsqueeze(1).expand(B, T).clone() * tool_mask
    assert torch.equal(grad[1, :2], torch.zeros(2)) and torch.allclose(grad, expected, atol=1e-6)


def test_supervised_prefix_tokens_are_trained_with_the_luffy_weight(tmp_path, opd_tokenizer):
    comps = Components.build(pg_weight=1.0, sampler=("prefix_rl", {"prefix_loss": "supervised", "gamma": 0.1}))
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 max_steps=1, gradient_accumulation_steps=1, steps_per_generation=1)
    tool_mask = torch.ones(B, T, dtype=torch.long)
    tool_mask[2, :3] = 0
    supervised = torch.zeros(B, T)
    supervised[2, :3] = 1
    roles = torch.tensor([0, 0, ROLES.index("prefix"), 0])
    batch = _batch(opd_tokenizer, sampler_role=roles, tool_mask=tool_mask, prefix_supervised_mask=supervised)
    assert float(batch["num_items_in_batch"]) == B * T  # the supervised tokens count
    grad, logps = _token_gradient(tr, batch)
    N, gamma = B * T, 0.1
    expected = (-ADV / N).unsqueeze(1).expand(B, T).clone() * tool_mask
    p = torch.exp(logps[2, :3])
    expected[2, :3] = -ADV[2] * p * gamma / (p + gamma) ** 2 / N
    assert torch.allclose(grad, expected, atol=1e-6)
