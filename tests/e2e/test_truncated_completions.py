"""``truncated_completions: mask_reward``: the task reward of a completion cut at ``max_completion_length`` is
unscored and nothing else changes: the first generation batch's advantages equal those of ``keep`` with a reward
function that returns None (TRL's "unscored") for the cut rows, its tokens stay in every loss term (also in a
divergence reward), and TRL's all-terms ``mask_truncated_completions`` is refused with it."""

import pytest
import torch
from helpers.tiny import even_token_reward, history, prompt_dataset

from opd_plugins import hookimpl
from opd_plugins.errors import RecipeError
from opd_plugins.manager import get_plugin_manager
from opd_plugins.recipe.loader import validate_recipe
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


def stop_tokens(tok):
    """The digits and letters end a completion too, so some stop before the 8-token cap and some are cut."""
    return [tok.eos_token_id, *tok.convert_tokens_to_ids(list("0123456789abcdefghijklmnopqrstuvwxyz"))]


def first_batch(tmp_path, tok, policy, reward, **components):
    pm = get_plugin_manager(entrypoints=False)
    rec = FirstBatch()
    pm.register(rec, name="first-batch")
    pm.check_hooks()
    model = build_tiny_model(tok, seed=0)
    model.generation_config.eos_token_id = stop_tokens(tok)
    args = OPDConfig(output_dir=str(tmp_path / f"{policy}-{reward.__name__}"), max_steps=1,
                     per_device_train_batch_size=8, num_generations=4, max_completion_length=8, logging_steps=1,
                     report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=0, disable_tqdm=True,
                     temperature=1.0, truncated_completions=policy)
    tr = OPDTrainer(model=model, args=args, components=Components.build(pm=pm, **components), plugin_manager=pm,
                    reward_funcs=[reward], train_dataset=prompt_dataset(), processing_class=tok)
    tr.train()
    return rec.seen, tr


def cut_rows(ids, mask, tok):
    """Cut rows by hand, as TRL reads them: the last generated token is no stop token (nor the pad)."""
    stops = {*stop_tokens(tok), tok.pad_token_id}
    return torch.tensor([int(sum(m)) > 0 and row[int(sum(m)) - 1] not in stops
                         for row, m in zip(ids.tolist(), mask.tolist())])


def runs(tmp_path, tok, **components):
    """keep; mask_reward; and the reference: keep with a reward that leaves the cut completions unscored."""
    stops = set(stop_tokens(tok)) | {tok.pad_token_id}

    def unscored_if_cut(completion_ids, **kwargs):
        return [None if ids and ids[-1] not in stops else r
                for ids, r in zip(completion_ids, even_token_reward(completion_ids))]

    keep, _ = first_batch(tmp_path, tok, "keep", even_token_reward, **components)
    masked, tr = first_batch(tmp_path, tok, "mask_reward", even_token_reward, **components)
    reference, _ = first_batch(tmp_path, tok, "keep", unscored_if_cut, **components)
    assert torch.equal(keep["ids"], masked["ids"]) and torch.equal(keep["ids"], reference["ids"])  # one batch
    cut = cut_rows(masked["ids"], masked["mask"], tok)
    assert 0 < int(cut.sum()) < len(cut), cut  # both kinds in the batch
    assert torch.equal(truncated_rows(masked["ids"], masked["mask"], sorted(stops)), cut)
    assert torch.equal(masked["mask"], keep["mask"])  # no token leaves the loss
    assert history(tr, "opd/reward_masked_truncated_frac") == [pytest.approx(float(cut.float().mean()))]
    return keep, masked, reference, cut


def test_mask_reward_unscores_the_cut_rows_task_reward(tmp_path, opd_tokenizer):
    keep, masked, reference, cut = runs(tmp_path, opd_tokenizer, pg_weight=1.0)
    torch.testing.assert_close(masked["advantages"], reference["advantages"], rtol=0, atol=0)
    assert torch.all(masked["advantages"][cut] == 0)
    assert bool((keep["advantages"][cut] != 0).any())  # keep: a cut row has a task-reward advantage


def test_mask_reward_keeps_a_divergence_reward_on_the_cut_rows(tmp_path, opd_tokenizer):
    """OPD as RL with a sparse part (``teacher_dense`` over ``grpo``): a cut row keeps the teacher's per-token
    reward and loses only its task-reward advantage."""
    comps = dict(teacher="self_context", divergence=("reverse_kl", {"estimator": "sampled"}), pg_weight=1.0,
                 advantage="teacher_dense")
    keep, masked, reference, cut = runs(tmp_path, opd_tokenizer, **comps)
    assert masked["advantages"].dim() == 2
    torch.testing.assert_close(masked["advantages"], reference["advantages"], rtol=0, atol=1e-7)
    m = masked["mask"].bool()
    assert bool((masked["advantages"][cut][m[cut]] != 0).any())  # the teacher's reward still trains them
    removed = (keep["advantages"] - masked["advantages"])[cut]
    assert bool((removed[m[cut]].abs() > 1e-3).any())  # and a task-reward advantage was taken off


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
