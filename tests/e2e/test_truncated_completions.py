"""``truncated_completions: mask_reward``: a completion cut at ``max_completion_length`` loses its task-reward
advantage and nothing else (its tokens stay in the divergence terms and in a divergence reward), against ``keep``
on the same first generation batch; TRL's ``mask_truncated_completions`` is the all-terms alternative and the two
are refused together."""

import pytest
import torch
from helpers.tiny import even_token_reward, history, prompt_dataset

from opd_plugins import hookimpl
from opd_plugins.manager import get_plugin_manager
from opd_plugins.recipe.loader import validate_recipe
from opd_plugins.errors import RecipeError
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDConfig, OPDTrainer
from opd_plugins.trainers.student import truncated_rows


class FirstBatch:
    """Keeps the first generation batch's completions, masks and advantages."""

    def __init__(self):
        self.seen = None

    @hookimpl
    def opd_advantages_computed(self, trainer, batch, advantages):
        if self.seen is None:
            self.seen = {"ids": batch["completion_ids"].clone(), "mask": batch["completion_mask"].clone(),
                         "advantages": advantages.detach().clone()}


def first_batch(tmp_path, tok, policy, **components):
    pm = get_plugin_manager(entrypoints=False)
    rec = FirstBatch()
    pm.register(rec, name="first-batch")
    pm.check_hooks()
    model = build_tiny_model(tok, seed=0)
    # the digits and a few letters end a completion too, so some stop before the 8-token cap and some are cut
    model.generation_config.eos_token_id = [tok.eos_token_id, *stop_tokens(tok)]
    args = OPDConfig(output_dir=str(tmp_path / policy), max_steps=1, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=8, logging_steps=1, report_to="none",
                     save_strategy="no", bf16=False, use_cpu=True, seed=0, disable_tqdm=True, temperature=1.0,
                     truncated_completions=policy)
    tr = OPDTrainer(model=model, args=args, components=Components.build(pm=pm, **components), plugin_manager=pm,
                    reward_funcs=[even_token_reward], train_dataset=prompt_dataset(), processing_class=tok)
    tr.train()
    return rec.seen, tr


def stop_tokens(tok):
    return tok.convert_tokens_to_ids(list("0123456789abcdefghijklmnopqrstuvwxyz"))


def by_hand(ids, mask, stops):
    """Cut rows, read as TRL does: the last generated token is no stop token."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        n = int(sum(m))
        out.append(n > 0 and row[n - 1] not in stops)
    return torch.tensor(out)


def test_mask_reward_zeroes_only_the_cut_rows_task_advantage(tmp_path, opd_tokenizer):
    keep, _ = first_batch(tmp_path, opd_tokenizer, "keep", pg_weight=1.0)
    masked, tr = first_batch(tmp_path, opd_tokenizer, "mask_reward", pg_weight=1.0)
    assert torch.equal(keep["ids"], masked["ids"])  # the same first generation batch
    stops = {opd_tokenizer.eos_token_id, opd_tokenizer.pad_token_id, *stop_tokens(opd_tokenizer)}
    cut = by_hand(masked["ids"], masked["mask"], stops)
    assert 0 < int(cut.sum()) < len(cut), cut  # both kinds in the batch
    assert torch.equal(truncated_rows(masked["ids"], masked["mask"], list(stops)), cut)
    assert bool((keep["advantages"][cut] != 0).any())  # keep: a cut row has a task-reward advantage
    assert torch.all(masked["advantages"][cut] == 0)
    assert torch.equal(masked["advantages"][~cut], keep["advantages"][~cut])  # the baseline is unchanged
    assert torch.equal(masked["mask"], keep["mask"])  # no token leaves the loss
    assert history(tr, "opd/reward_masked_truncated_frac") == [pytest.approx(float(cut.float().mean()))]


def test_mask_reward_keeps_a_divergence_reward_on_the_cut_rows(tmp_path, opd_tokenizer):
    """With the divergence's per-token reward in the advantages (OPD as RL), a cut row keeps exactly that reward:
    keep - mask_reward is the row's task-reward advantage, one constant over its tokens, and 0 on the other rows."""
    comps = dict(teacher="self_context", divergence=("reverse_kl", {"estimator": "sampled"}), pg_weight=1.0,
                 div_reward_weight=1.0)
    keep, _ = first_batch(tmp_path, opd_tokenizer, "keep", **comps)
    masked, _ = first_batch(tmp_path, opd_tokenizer, "mask_reward", **comps)
    assert torch.equal(keep["ids"], masked["ids"]) and keep["advantages"].dim() == 2
    stops = {opd_tokenizer.eos_token_id, opd_tokenizer.pad_token_id, *stop_tokens(opd_tokenizer)}
    cut = by_hand(masked["ids"], masked["mask"], stops)
    assert 0 < int(cut.sum()) < len(cut)
    m = masked["mask"].bool()
    assert bool((masked["advantages"][cut][m[cut]] != 0).any())  # the divergence reward still trains them
    diff = keep["advantages"] - masked["advantages"]
    torch.testing.assert_close(diff[~cut], torch.zeros_like(diff[~cut]))
    removed = []
    for i in torch.nonzero(cut).flatten().tolist():
        row = diff[i][m[i]]
        torch.testing.assert_close(row, row[:1].expand_as(row), atol=1e-6, rtol=0)
        removed.append(float(row[0]))
    assert any(abs(v) > 1e-3 for v in removed), removed  # a task-reward advantage was taken off


def test_mask_reward_and_trls_mask_truncated_completions_are_refused_together(tmp_path):
    with pytest.raises(ValueError, match="choose one"):
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, truncated_completions="mask_reward",
                  mask_truncated_completions=True)
    with pytest.raises(ValueError, match="'keep' or 'mask_reward'"):
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, truncated_completions="drop")
    raw = {"model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"task": {"name": "arithmetic"}},
           "trainer": {"args": {"truncated_completions": "mask_reward", "mask_truncated_completions": True}}}
    with pytest.raises(RecipeError, match=r"trainer\.args\.truncated_completions: mask_reward .* choose one"):
        validate_recipe(raw, "recipe.yaml")
    raw["trainer"]["args"] = {"truncated_completions": "drop"}
    with pytest.raises(RecipeError, match=r"truncated_completions: unknown value 'drop'.*Choices: keep, mask_reward"):
        validate_recipe(raw, "recipe.yaml")
