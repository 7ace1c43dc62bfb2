"""``OPDTrainer``: a thin ``GRPOTrainer`` subclass that calls the recipe's components and the hooks.

The trainer owns no algorithm. At each phase of a step it calls a component or a hook:

prompts ─sampler.prepare─▶ (opd_prompts_prepared) ─rollout.generate─▶ (opd_rollout_end) ─rewards─▶
(opd_rewards_scored) ─teacher.score─▶ (opd_teacher_scored) ─advantage.compute─▶ (opd_degenerate_groups,
opd_advantages_computed) ─token_weighting─▶ loss = pg_weight(t)·PG + div_weight(t)·D (+ opd_loss_terms)
─▶ (opd_step_metrics).

TRL override points (trl 1.16, private, hence the pin): ``_generate``, ``_generate_single_turn``,
``_calculate_rewards``, ``_generate_and_score_completions``, ``_compute_loss``,
``_get_per_token_logps_and_entropies`` (to reuse the policy-gradient forward for the divergence),
``_save_checkpoint`` / ``_load_optimizer_and_scheduler`` (atomic checkpoints with component state). The phases
share their data through one :class:`~opd_plugins.trainers.step_state.StepState` (``self.step``); components get
a :class:`~opd_plugins.context.SetupContext` (:meth:`OPDTrainer.setup_context`), never the trainer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import is_async_callable

from opd_plugins.advantages.base import AdvantageInputs, degenerate_groups, reward_to_go
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.correction import combine_stats, divergence_weights, importance_weights, weight_advantages
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.errors import ModelLoadError, OPDError, TeacherError
from opd_plugins.prompt_selection import build_selection_sampler
from opd_plugins.samplers.base import ROLES, Guidance, SamplerFeedback
from opd_plugins.teachers.base import CAPABILITY_ORDER, TeacherBatch, TeacherScores
from opd_plugins.token_weighting.base import GenerationBatch
from opd_plugins.trainers import guided as guide
from opd_plugins.trainers.checkpointing import HookedTrainerMixin
from opd_plugins.trainers.components import Components
from opd_plugins.trainers.diagnostics import StepDiagnostics
from opd_plugins.trainers.guards import check_finite_terms
from opd_plugins.trainers.lookahead import DataLookahead
from opd_plugins.trainers.opd_config import OPDConfig
from opd_plugins.trainers.selection import detached, index_dataset, observe_batch
from opd_plugins.trainers.step_state import StepState
from opd_plugins.trainers.student import full_vocab_outputs, fused_outputs, loss_mask, truncated_rows


class OPDTrainer(HookedTrainerMixin, GRPOTrainer):
    """On-policy distillation, self-distillation, GRPO and hybrids: one trainer, chosen by components.

    Takes every ``GRPOTrainer`` argument, plus ``components`` (a :class:`Components`; default: GRPO with no
    teacher), ``plugin_manager`` (default: built-ins and installed plugins) and ``recipe`` (kept for hooks).
    Subclass it as you would a TRL trainer; override the public ``compute_*`` helpers below for small changes.
    """

    _tag_names = ["trl", "opd_plugins"]

    def __init__(self, model: Any, args: OPDConfig | None = None, *, components: Components | None = None,
                 plugin_manager: Any = None, recipe: Any = None, **kwargs: Any) -> None:
        if plugin_manager is None:
            from opd_plugins.manager import get_plugin_manager

            plugin_manager = get_plugin_manager()
        self.pm = plugin_manager
        self.components = components if components is not None else Components()
        self.recipe = recipe
        self.step = StepState()
        self._lookahead: DataLookahead | None = None
        self._synced_version: int | None = None
        self._loader_selection: Any = None  # a copy for the look-ahead's dataloader (_lookahead_dataloader)
        _check_components(self.components)
        if "train_dataset" in kwargs:  # rows say which dataset prompt they are (trainers.selection)
            kwargs["train_dataset"] = index_dataset(kwargs["train_dataset"], self.components.prompt_selection)
        # Pure distillation needs no task reward, but TRL requires a reward source: give it a constant one and
        # leave advantages to the divergence.
        self._has_rewards = bool(kwargs.get("reward_funcs")) or kwargs.get("environment_factory") is not None
        if not self._has_rewards:
            gated = [tw.name for tw in self.components.token_weighting if tw.requires_rewards()]
            if gated:
                raise OPDError(f"token weighting {', '.join(gated)} gates on task rewards, but the trainer has no "
                               "reward_funcs")
            kwargs["reward_funcs"] = [no_task_reward]
        _refuse_multimodal(self.text_only_parts(), _image_columns(kwargs.get("train_dataset")), "the training dataset")
        super().__init__(model=model, args=args, **kwargs)
        self.reward_funcs = [_checked_reward_func(f, n) for f, n in zip(self.reward_funcs, self.reward_func_names)]
        if self.components.correction.mode != "none" and self.use_vllm and self.vllm_importance_sampling_correction:
            raise OPDError("correction is set but TRL's own vLLM importance-sampling correction is also on, which "
                           "would weight every token twice; set vllm_importance_sampling_correction=False")
        self.teacher_at_loss = self._resolve_teacher_scoring()
        StepDiagnostics.check(self.components.diagnostics, self.components, self.sharding(), self.args)
        self.diagnostics = StepDiagnostics(self.components.diagnostics,
                                           lambda t: self.accelerator.reduce(t, reduction="sum"), self._log)
        ctx = self.setup_context()
        self.components.rollout.setup(ctx)
        self.components.sampler.setup(ctx)
        if self.components.teacher is not None:
            self.components.teacher.setup(ctx)
        for reference in self._references():
            reference.setup(ctx)
        self._synced_version = self.state.global_step
        self.pm.call("opd_trainer_init", trainer=self)

    def _resolve_teacher_scoring(self) -> bool:
        """Whether the teacher scores each micro-batch at loss time (``OPDConfig.teacher_scoring``)."""
        c = self.components
        mode = getattr(self.args, "teacher_scoring", "auto")
        if c.teacher is None or c.divergence is None or c.divergence.requires() != "full" or mode == "generation":
            return False
        can = bool(getattr(c.teacher, "scores_any_rows", False))
        if mode == "loss" and not can:
            raise OPDError(f"teacher_scoring='loss' scores each micro-batch in the loss, but teacher "
                           f"{c.teacher.name!r} does not score arbitrary rows at any time (Teacher.scores_any_rows); "
                           "use teacher_scoring: generation (or auto)")
        return can

    def text_only_parts(self) -> list[str]:
        """The parts of this run that score completions as text only (no images reach them): the teacher, the
        reference policies, the divergence's student side and the correction's recomputed log-probs."""
        c = self.components
        parts = [f"teacher {c.teacher.name!r}"] if c.teacher is not None else []
        parts += [f"reference {r.name!r}" for r in self._references()]
        if c.divergence is not None:
            parts.append(f"divergence {c.divergence.name!r}")
        if c.correction.mode != "none":
            parts.append(f"correction {c.correction.mode!r}")
        return parts

    def _references(self) -> list[Any]:
        """The reference-policy teachers the divergence and the advantage estimator name (set up with the others)."""
        c = self.components
        refs = [c.divergence.reference() if c.divergence is not None else None, c.advantage.reference()]
        return [r for r in refs if r is not None]

    def setup_context(self) -> SetupContext:
        """What components see of this trainer (see :class:`~opd_plugins.context.SetupContext`)."""
        from types import MappingProxyType

        return SetupContext(
            model=self.accelerator.unwrap_model(self.model), tokenizer=self.processing_class,
            device=self.accelerator.device, temperature=float(self.temperature),
            chat_template_kwargs=dict(getattr(self, "chat_template_kwargs", None) or {}), registry=self.pm.registry,
            log=self._log, progress=lambda: (self.state.global_step, self.state.max_steps or 0),
            on_optimizer_step=self.on_optimizer_step, sharding=self.sharding(),
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes,
            max_completion_length=self.max_completion_length, generation_config=getattr(self, "generation_config", None),
            eos_token_ids=getattr(self, "eos_token_ids", None), pad_to_multiple_of=getattr(self, "pad_to_multiple_of", None),
            trl_generate=self._trl_generate, peers=MappingProxyType(self.components.named()),
            shard_frozen=self._shard_frozen if self.sharding() in ("fsdp", "deepspeed_zero3") else None,
        )

    def _shard_frozen(self, module: Any) -> Any:
        """A frozen module sharded with the student's engine (TRL's own helpers, as for its reference model)."""
        from trl.models.utils import prepare_deepspeed, prepare_fsdp

        module = module.eval().requires_grad_(False)
        if self.sharding() == "fsdp":
            return prepare_fsdp(module, self.accelerator)
        return prepare_deepspeed(module, self.accelerator)

    def sharding(self) -> str:
        """``fsdp``, ``deepspeed_zero3``, ``ddp`` or ``none``: how the student's parameters are laid out."""
        if getattr(self, "is_fsdp_enabled", False):
            return "fsdp"
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if getattr(self, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3:
            return "deepspeed_zero3"
        return "ddp" if self.accelerator.num_processes > 1 else "none"

    def on_optimizer_step(self, fn: Any) -> None:
        """Call ``fn()`` after every optimizer step (after gradient accumulation, before that step's checkpoint is
        saved; not when an fp16 overflow skipped the step)."""
        from transformers import TrainerCallback

        accelerator = self.accelerator

        class _AfterOptimizerStep(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if not getattr(accelerator, "optimizer_step_was_skipped", False):
                    fn()

        self.add_callback(_AfterOptimizerStep())

    def _trl_generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's own generation path (transformers or vLLM, as configured), for rollout backends built on it."""
        return GRPOTrainer._generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images=has_tool_images)

    def close_components(self) -> None:
        """Call every component's ``close()`` (threads, connections, spawned teacher servers). Each failure is
        reported after the others have closed."""
        errors = []
        for name, component in self.components.named().items():
            try:
                component.close()
            except Exception as exc:  # noqa: BLE001 - close the rest first
                errors.append(f"{name} ({component.name}): {exc}")
        if errors:
            raise OPDError("closing components failed: " + "; ".join(errors))

    # ------------------------------------------------------------------------------------------------------
    # Small helpers subclasses may override
    # ------------------------------------------------------------------------------------------------------
    def weight(self, schedule: Any) -> float:
        """Current value of a coefficient schedule."""
        return float(schedule.value(self.state.global_step, self.state.max_steps or 0))

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _log(self, name: str, value: float) -> None:
        self._metrics[self._mode()][name].append(float(value))

    # ------------------------------------------------------------------------------------------------------
    # Prompts and rollout
    # ------------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        """TRL's ``RepeatSampler`` structure, each chunk's prompts chosen by the ``prompt_selection`` component
        (``uniform``: ``RepeatSampler``'s order, index for index)."""
        return build_selection_sampler(
            self._loader_selection if self._loader_selection is not None else self.components.prompt_selection,
            dataset if dataset is not None else self.train_dataset, num_generations=self.num_generations,
            generation_batch_size=self.args.generation_batch_size, num_iterations=self.num_iterations,
            steps_per_generation=self.args.steps_per_generation, seed=self.args.seed, shuffle=self.shuffle_dataset,
            step_fn=lambda: self.state.global_step)

    def _lookahead_dataloader(self) -> Any:
        """A second training dataloader over the same data order, its sampler walking a copy of the prompt selection
        (reading ahead draws nothing from the run's)."""
        self._loader_selection = detached(self.components.prompt_selection)
        try:
            return self.get_train_dataloader()
        finally:
            self._loader_selection = None

    def _generate(self, prompts: list):
        rows = self.step.rows if self.step.rows is not None and len(self.step.rows) == len(prompts) \
            else [{} for _ in prompts]
        guided = None
        if self._mode() == "train":  # held-out prompts are never guided
            sampler = self.components.sampler
            output = sampler.prepare(list(prompts), rows, self.state.global_step)
            guided = guide.plan(sampler, output, list(prompts), self._tokenizer, self.max_completion_length)
            prompts = guided.prompts
            self.step.sampler_output = output
        self.step.guided, self.step.guided_consumed, self.step.swap_behaviour = guided, False, {}
        n = len(prompts)
        self.pm.call("opd_modify_prompts", trainer=self, prompts=prompts, rows=rows)
        if len(prompts) != n:
            raise OPDError(f"a plugin's opd_modify_prompts changed the number of prompts from {n} to {len(prompts)}")
        self.pm.call("opd_prompts_prepared", trainer=self, prompts=prompts, rows=rows)
        self.step.student_prompts = list(prompts)
        result = super()._generate(prompts)
        if guided is not None and guided.any_guided:
            result = self._apply_guidance(guided, result)
        prompt_ids, completion_ids, _tool_mask, completions, logprobs = result[:5]
        versions = self.step.policy_versions or [self.state.global_step] * len(completion_ids)
        self.pm.call("opd_rollout_end", trainer=self, rollout={
            "prompt_ids": prompt_ids, "completion_ids": completion_ids, "completions": completions,
            "logprobs": logprobs, "policy_version": min(versions) if versions else self.state.global_step,
        })
        return result

    def _apply_guidance(self, guided: guide.GuidedBatch, result: tuple) -> tuple:
        """TRL's ``_generate`` result with the guidance applied: ``swap`` rows get their original prompt back (the
        one they are trained on, and the teacher scores them with), forced prefix tokens leave TRL's ``tool_mask``."""
        prompt_ids, completion_ids, tool_mask, *rest = result
        swap = guided.rows_with("swap")
        if swap:
            originals = self._tokenize_prompts([guided.originals[i] for i in swap])[0]
            for i, ids in zip(swap, originals, strict=True):
                prompt_ids[i] = ids
                self.step.student_prompts[i] = guided.originals[i]
        tool_mask = guide.prefix_tool_mask(completion_ids, tool_mask, guided)
        return (prompt_ids, completion_ids, tool_mask, *rest)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rollout, step = self.components.rollout, self.state.global_step
        if self._synced_version != step:  # the policy changed since the last rollout
            rollout.sync_weights(self.accelerator.unwrap_model(self.model), step)
            self._synced_version = step
        guided = self.step.guided if self._mode() == "train" and not self.step.guided_consumed else None
        self.step.guided_consumed = True  # later calls in this batch (TRL's tool-call turns) are not guided
        if guided is not None and len(guided.roles) != len(prompt_ids):
            raise OPDError(f"sampler {self.components.sampler.name!r}: {len(guided.roles)} guided rollouts, but "
                           f"{len(prompt_ids)} prompts reached the rollout")
        gen_ids = guide.with_prefixes(list(prompt_ids), guided)
        out = rollout.generate(gen_ids, Sampling(num_generations=num_generations, step=step, images=images,
                                                 multimodal_fields=multimodal_fields,
                                                 has_tool_images=has_tool_images))
        if not isinstance(out, Rollouts):
            raise OPDError(f"rollout {rollout.name!r} returned {type(out).__name__}, not opd_plugins.context.Rollouts")
        if len(out.completion_ids) != len(prompt_ids) or (
                out.behaviour_logps is not None and len(out.behaviour_logps) != len(prompt_ids)):
            raise OPDError(f"rollout {rollout.name!r} returned {len(out.completion_ids)} completions for "
                           f"{len(prompt_ids)} prompts")
        self.step.policy_versions = out.versions()
        completion_ids, logps = out.completion_ids, out.behaviour_logps
        if guided is not None and guided.rows_with("swap"):  # π_old(y | x, h): the hinted generation's log-probs
            swap = guided.rows_with("swap")
            if logps is not None:
                behaviour = [list(logps[i]) for i in swap]
            elif getattr(rollout, "samples_policy", False):  # the policy sampled them: one no-grad forward
                behaviour = self._policy_logps([gen_ids[i] for i in swap], [completion_ids[i] for i in swap])
            else:
                raise OPDError(f"sampler {self.components.sampler.name!r} swaps prompts, which needs the behaviour "
                               f"log-probs of the hinted generation, but rollout {rollout.name!r} reports none and "
                               "does not sample the training policy itself")
            self.step.swap_behaviour = dict(zip(swap, behaviour, strict=True))
        return guide.prepend_prefixes(completion_ids, logps, guided, self.max_completion_length)

    def _policy_logps(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The current policy's log-probs of ``completion_ids`` after ``prompt_ids`` (no gradient), per row."""
        pad = self._tokenizer.pad_token_id
        P, T = max(len(p) for p in prompt_ids), max(max(len(c) for c in completion_ids), 1)
        device = self.accelerator.device
        ids = torch.full((len(prompt_ids), P + T), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p, device=device), 1
            ids[i, P:P + len(c)], mask[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long, device=device), 1
        with torch.no_grad():
            logps = self._get_per_token_logps_and_entropies(self.model, ids, mask, T,
                                                            batch_size=self.args.per_device_train_batch_size)[0]
        return [logps[i, :len(c)].tolist() for i, c in enumerate(completion_ids)]

    # ------------------------------------------------------------------------------------------------------
    # Rewards, teacher, advantages
    # ------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.step.rewards_per_func = rewards_per_func
        if self._has_rewards:
            self.pm.call("opd_rewards_scored", trainer=self, rewards_per_func=rewards_per_func,
                         reward_names=list(self.reward_func_names))
        return rewards_per_func

    def buffer_steps(self) -> range:
        """The optimizer steps that will train on the generation batch made now: TRL reuses one generation batch
        for ``steps_per_generation × num_iterations`` micro-steps, i.e. this many optimizer steps."""
        per_step = max(int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps), 1)
        n = max(1, math.ceil(self.args.steps_per_generation * self.num_iterations / per_step))
        return range(self.state.global_step, self.state.global_step + n)

    def weight_during_buffer(self, schedule: Any) -> bool:
        """Whether ``schedule`` is non-zero at any optimizer step this generation batch serves (so the teacher
        must score it now, even if the weight is 0 at this very step: a warm-up starting at 0, say)."""
        total = self.state.max_steps or 0
        return any(float(schedule.value(s, total)) != 0 for s in self.buffer_steps())

    def prefetch_next(self, rows: list[dict[str, Any]]) -> None:
        """Tell a rollout backend that generates ahead (``async``) which generation batches follow ``rows``, from a
        look-ahead over the same data order (:mod:`opd_plugins.trainers.lookahead`)."""
        ahead = int(getattr(getattr(self.components.rollout, "params", None), "ahead", 1))
        if ahead <= 0:
            return
        if self._lookahead is None:
            repeats = self.num_iterations * self.args.steps_per_generation
            self._lookahead = DataLookahead(self._lookahead_dataloader, repeats,
                                            max_search=len(self.train_dataset) + 2)
        batches = []
        for upcoming in self._lookahead.after(list(rows), ahead):
            ids = self._tokenize_prompts([r["prompt"] for r in upcoming])[0]
            batches.append((ids, Sampling(num_generations=self.num_generations, step=self.state.global_step)))
        self.components.rollout.prefetch(batches)
        self._log("rollout/async/misaligned", float(self._lookahead.misaligned))

    def record_guidance(self, out: dict[str, Any]) -> None:
        """Put the sampler's guidance in the generation batch: ``sampler_role`` ``(B,)`` (codes of
        :data:`~opd_plugins.samplers.base.ROLES`), ``swap_behaviour_logps`` ``(B, T)`` (log π_old(y | x, h) of the
        swap rows) and ``prefix_supervised_mask`` ``(B, T)`` (supervised prefix tokens, which then count in the
        token normaliser); log each role's share of the rollouts."""
        guided = self.step.guided
        if guided is None:
            return
        B, T = out["completion_ids"].shape
        device = out["completion_ids"].device
        counts = self.accelerator.reduce(torch.tensor([float(guided.roles.count(r)) for r in ROLES], device=device),
                                         reduction="sum")
        for role, count in zip(ROLES, counts.tolist(), strict=True):
            self._log(f"sampler/role/{role}", count / max(float(counts.sum()), 1.0))
        if not guided.any_guided:
            return
        out["sampler_role"] = guided.role_codes(device)
        if self.step.swap_behaviour:
            behaviour = torch.zeros(B, T, device=device)
            for i, values in self.step.swap_behaviour.items():
                n = min(len(values), T)
                behaviour[i, :n] = torch.tensor(values[:n], device=device)
            out["swap_behaviour_logps"] = torch.nan_to_num(behaviour, nan=0.0)
        if any(guided.supervised):
            supervised = guide.supervised_prefix_mask(guided, (B, T), device) * out["completion_mask"]
            out["prefix_supervised_mask"] = supervised
            out["num_items_in_batch"] = self.accelerator.gather((loss_mask(out) + supervised).sum()).sum()
        prefix = torch.tensor([float(len(x)) for x in guided.prefix_ids], device=device)
        self._log("sampler/prefix_tokens_mean", float(prefix.mean()))

    def _generation_want(self) -> str | None:
        """What the teacher scores for the whole generation batch: what the divergence needs, or (teacher scored
        per micro-batch at loss time) the sampled tokens' log-probs when a per-token reward or a token weighting
        reads them now, or nothing."""
        if not self._needs_teacher():
            return None
        c = self.components
        if not self.teacher_at_loss:
            return c.divergence.requires()
        now = c.advantage.needs_token_reward or self.weight_during_buffer(c.div_reward_weight) or c.token_weighting
        return "sampled" if now else None

    def _needs_teacher(self) -> bool:
        c = self.components
        return c.teacher is not None and c.divergence is not None and (
            self.weight_during_buffer(c.div_weight) or self.weight_during_buffer(c.div_reward_weight)
            or c.advantage.needs_token_reward
        )

    def _generate_and_score_completions(self, inputs):
        self.step.new_generation_batch(inputs)
        _refuse_multimodal(self.text_only_parts(), _image_columns(inputs), "this generation batch")
        out = super()._generate_and_score_completions(inputs)
        images = sorted(MULTIMODAL_KEYS & set(out))
        _refuse_multimodal(self.text_only_parts(), images, "this generation batch")
        self.record_guidance(out)
        if self._mode() == "train" and self.components.rollout.generates_ahead:
            self.prefetch_next(inputs)
        mask = loss_mask(out)
        if not images:  # the recomputed log-probs would miss the images: no correction statistics
            self.apply_correction(out, mask)
        scores = None
        want = self._generation_want()
        if want is not None:
            scores = self.score_teacher(out, inputs, want)
            out.update(scores.to_batch())
        if self.teacher_at_loss and self._needs_teacher():  # the loss scores each micro-batch: find its rows
            B = mask.shape[0]
            self.step.generations += 1
            self.step.deferred[self._mode()] = (self.step.generations, list(inputs),
                                                list(self.step.student_prompts or [r.get("prompt") for r in inputs]))
            out["opd_row_index"] = torch.arange(B, device=mask.device)
            out["opd_generation_id"] = torch.full((B,), self.step.generations, device=mask.device)
        versions = self.step.policy_versions
        if versions is None or len(versions) != mask.shape[0]:
            versions = [self.state.global_step] * mask.shape[0]
        out.setdefault("policy_version", torch.tensor(versions, device=mask.device))
        out["advantages"] = self.compute_advantages(out, inputs, scores, mask)
        if self._mode() == "train":  # the batch's prompts and total rewards, the same on every rank
            from accelerate.utils import gather_object

            for key, value in observe_batch(self.components.prompt_selection, inputs, self.step.global_rewards,
                                            self.num_generations, self.state.global_step,
                                            gather_object if self.accelerator.num_processes > 1 else None).items():
                self._log(key, value)
        self.prepare_token_weightings(out, scores)
        shape = tuple(out["advantages"].shape)
        self.pm.call("opd_modify_advantages", trainer=self, batch=out, advantages=out["advantages"])
        if tuple(out["advantages"].shape) != shape:
            raise OPDError(f"a plugin's opd_modify_advantages changed the advantages' shape {shape}")
        self.pm.call("opd_advantages_computed", trainer=self, batch=out, advantages=out["advantages"])
        return out

    def prepare_token_weightings(self, out: dict[str, Any], scores: TeacherScores | None) -> None:
        """Each token weighting's statistics of the whole generation batch (before TRL shuffles and splits it),
        stored in the batch as ``token_weighting.<i>.<key>`` and handed back to it in every micro-batch."""
        c = self.components
        if not c.token_weighting:
            return
        cache: dict[str, torch.Tensor] = {}

        def student_logps() -> torch.Tensor:
            if "logps" not in cache:
                cache["logps"] = self.student_token_logps(out)
            return cache["logps"]

        B = out["completion_ids"].shape[0]
        batch = GenerationBatch(rewards=out["rewards"], global_rewards=self.step.global_rewards, local=self.step.local,
                                num_generations=self.num_generations if self._mode() == "train"
                                else self.num_generations_eval, mask=loss_mask(out), teacher=scores,
                                _student_logps=student_logps)
        for i, tw in enumerate(c.token_weighting):
            for key, value in (tw.prepare(batch) or {}).items():
                if value.shape[0] != B:
                    raise OPDError(f"token weighting {tw.name!r}: prepare() returned {key!r} with {value.shape[0]} "
                                   f"rows for {B} completions")
                out[f"token_weighting.{i}.{key}"] = value

    def apply_correction(self, out: dict[str, Any], mask: torch.Tensor) -> None:
        """Importance weights for rollouts whose backend reported behaviour log-probs (docs/correction.md).

        Stores ``out["correction_weights"]`` (B, T) for the policy gradient unless the mode is ``none``, and
        ``out["divergence_correction_weights"]`` for the divergence when it is weighted
        (:func:`~opd_plugins.correction.divergence_weights`); logs ``correction/*``."""
        behaviour = out.get("sampling_per_token_logps")
        if behaviour is None:
            return
        train = out.get("old_per_token_logps")
        if train is None:  # TRL skips it when generation and optimisation are aligned: one no-grad forward
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            batch_size = (self.args.per_device_train_batch_size if self._mode() == "train"
                          else self.args.per_device_eval_batch_size)
            with torch.no_grad():
                train, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, out["completion_ids"].shape[1], batch_size=batch_size)
        spec = self.components.correction
        swap = _swap_rows(out)
        if swap is not None:  # the sampler's shaping weights these rows, not the correction (docs/samplers.md)
            mask = mask * (~swap).unsqueeze(1).to(mask.dtype)
        result = importance_weights(train, behaviour, mask, spec)
        if swap is not None:
            result.weights = torch.where(swap.unsqueeze(1), loss_mask(out).to(result.weights.dtype), result.weights)
        if spec.mode != "none":
            out["correction_weights"] = result.weights
            divergence = self.components.divergence
            if divergence is not None:
                weights = divergence_weights(train, behaviour, mask, spec, policy_gradient=result.weights,
                                             per_state=divergence.requires() != "sampled")
                if weights is not None:
                    out["divergence_correction_weights"] = weights
        from accelerate.utils import gather_object

        for key, value in combine_stats(gather_object([result.stats])).items():
            self._log(f"correction/{key}", value)

    def teacher_batch(self, out: dict[str, Any], rows: list[dict[str, Any]],
                      prompts: list[Any] | None = None, *, full_as_hidden: bool = False) -> TeacherBatch:
        """What teachers score: this rank's completions with the prompts the student saw and the dataset rows.
        With a divergence that takes the teacher's head (``fused_lm_head``), a local teacher computes its scores
        chunk by chunk from its hidden states and, with ``full_as_hidden`` (scores used in this micro-batch only),
        may give its full vocabulary as hidden states and lm head."""
        if prompts is None:
            prompts = self.step.student_prompts or [r.get("prompt") for r in rows]
        divergence = self.components.divergence
        head_chunk = self.fused_chunk() if divergence is not None and divergence.takes_teacher_head() else 0
        return TeacherBatch(
            prompt_ids=out["prompt_ids"], prompt_mask=out["prompt_mask"], completion_ids=out["completion_ids"],
            completion_mask=loss_mask(out).to(out["completion_mask"].dtype), prompts=list(prompts), rows=list(rows),
            head_chunk=head_chunk, full_as_hidden=full_as_hidden and head_chunk > 0,
        )

    def reference_logps(self, reference: Any, batch: TeacherBatch, owner: str) -> TeacherScores:
        """A reference policy's scores of the sampled tokens (``owner`` names who asked, for errors)."""
        ref = reference.score(batch, "sampled")
        ref.validate(batch, f"{reference.name} (reference of {owner})",
                     allow_nonfinite=getattr(reference.params, "allow_nonfinite", False))
        return ref

    def score_teacher(self, out: dict[str, Any], rows: list[dict[str, Any]], want: str | None = None, *,
                      prompts: list[Any] | None = None, hooks: bool = True,
                      full_as_hidden: bool = False) -> TeacherScores:
        """The teacher's checked scores of ``out``'s completions (``want``: default what the divergence needs), with
        the divergence's reference log-probs; logs ``teacher/*`` and calls ``opd_teacher_scored`` (``hooks``).
        ``full_as_hidden``: see :meth:`teacher_batch`."""
        c = self.components
        batch = self.teacher_batch(out, rows, prompts, full_as_hidden=full_as_hidden)
        want = want or c.divergence.requires()
        scores = c.teacher.score(batch, want)
        if not isinstance(scores, TeacherScores):
            raise TeacherError(f"teacher {c.teacher.name!r} returned {type(scores).__name__}, not TeacherScores")
        if CAPABILITY_ORDER[scores.capability] < CAPABILITY_ORDER[want]:
            raise TeacherError(f"teacher {c.teacher.name!r} was asked for {want!r} scores but returned {scores.capability!r}")
        n_bad = scores.validate(batch, c.teacher.name, allow_nonfinite=getattr(c.teacher.params, "allow_nonfinite", False))
        if n_bad:
            self._log("teacher/nonfinite_masked", n_bad)
        reference = c.divergence.reference()
        if reference is not None:  # the divergence's reference policy π_ref scores the same tokens
            ref = self.reference_logps(reference, batch, c.divergence.name)
            scores.ref_token_logps = ref.token_logps
            scores.mask = scores.mask * ref.mask
        if hooks:
            if scores.entropy is not None:
                m = scores.mask
                self._log("teacher/entropy", float((scores.entropy * m).sum() / m.sum().clamp(min=1)))
            self.pm.call("opd_teacher_scored", trainer=self, batch=out, scores=scores)
        return scores

    def loss_time_teacher(self, inputs: dict[str, Any]) -> TeacherScores:
        """The teacher's scores of one micro-batch, computed now (``teacher_scoring: loss``): its rows and prompts
        are found through ``opd_row_index`` in the generation batch they came from."""
        mode = self._mode()
        index, generation = inputs.get("opd_row_index"), inputs.get("opd_generation_id")
        stored = self.step.deferred.get(mode)
        if index is None or generation is None or stored is None or not bool((generation == stored[0]).all()):
            raise TeacherError("the teacher scores this micro-batch at loss time (teacher_scoring), but it does not "
                               "come from the current generation batch: a custom _prepare_inputs must keep the "
                               "batch's opd_row_index and opd_generation_id")
        _, rows, prompts = stored
        picked = [int(i) for i in index.tolist()]
        with torch.no_grad():
            return self.score_teacher(inputs, [rows[i] for i in picked], prompts=[prompts[i] for i in picked],
                                      full_as_hidden=True)

    def student_token_logps(self, out: dict[str, Any]) -> torch.Tensor:
        """``(B, T)`` the policy's log-probs of the sampled tokens of a generation batch, no gradient: TRL's
        ``old_per_token_logps`` when it computed them, else one forward in micro-batches (never ``(B, T, V)``)."""
        old = out.get("old_per_token_logps")
        if old is not None:
            return old
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        size = self.args.per_device_train_batch_size if self._mode() == "train" else self.args.per_device_eval_batch_size
        divergence = self.components.divergence
        T = out["completion_ids"].shape[1]
        with torch.no_grad():
            if divergence is not None and divergence.uses_hidden_states():
                # the divergence's own fused lm head, chunk by chunk: not even one micro-batch's (b, T, V) logits
                return self.fused_policy_logps(self.model, ids, am, T, size, False)[0]
            return self._get_per_token_logps_and_entropies(self.model, ids, am, T, batch_size=size)[0]

    def by_micro_batch(self, out: dict[str, Any], rows: list[dict[str, Any]], scores: TeacherScores | None,
                       fn: Any) -> torch.Tensor:
        """``fn(student, teacher)`` over a generation batch's rows, a micro-batch at a time, with the student's
        full-vocabulary outputs and the teacher's scores of those rows (sliced from ``scores`` when they have what
        the divergence needs, else scored now): nothing ``(B, T, V)`` for the whole batch. No gradient."""
        c = self.components
        B = out["completion_ids"].shape[0]
        size = self.args.per_device_train_batch_size if self._mode() == "train" else self.args.per_device_eval_batch_size
        prompts = self.step.student_prompts or [r.get("prompt") for r in rows]
        have = scores is not None and CAPABILITY_ORDER[scores.capability] >= CAPABILITY_ORDER[c.divergence.requires()]
        pieces = []
        with torch.no_grad():
            for lo in range(0, B, size):
                sl = slice(lo, min(lo + size, B))
                sub = {k: v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                       for k, v in out.items()}
                teacher = scores.rows(sl) if have else self.score_teacher(sub, rows[sl], prompts=prompts[sl],
                                                                         hooks=False)
                pieces.append(fn(self.student_outputs(self.model, sub, grad=False), teacher))
        return torch.cat(pieces)

    def compute_advantages(self, out: dict[str, Any], rows: list[dict[str, Any]], scores: TeacherScores | None,
                           mask: torch.Tensor) -> torch.Tensor:
        """Advantages from the advantage estimator, plus the divergence's per-token reward when
        ``div_reward_weight`` is non-zero (OPD as RL). Also stores this rank's total rewards as ``out["rewards"]``
        (read by token weightings)."""
        c = self.components
        mode = self._mode()
        B = out["completion_ids"].shape[0]
        device = out["completion_ids"].device
        num_gen = self.num_generations if mode == "train" else self.num_generations_eval
        local = slice(self.accelerator.process_index * B, (self.accelerator.process_index + 1) * B)
        if self._has_rewards and self.step.rewards_per_func is not None:
            rpf = self.step.rewards_per_func
            rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        else:
            rewards = torch.full((B * self.accelerator.num_processes,), float("nan"), device=device)
        if self.args.truncated_completions == "mask_reward" and self._has_rewards:
            rewards = self.unscore_truncated(out, rewards)
        out["rewards"] = rewards[local].to(device)
        self.step.global_rewards, self.step.local = rewards, local
        token_reward = token_value = None
        w_r = self.weight(c.div_reward_weight) if c.divergence is not None else 0.0
        need_token_reward = c.advantage.needs_token_reward or w_r != 0
        if need_token_reward and scores is not None and c.divergence is not None:
            if c.divergence.reward_requires() == "sampled":  # token log-probs only: no (B, T, V) student logits
                student = StudentOutputs(token_logps=self.student_token_logps(out), mask=mask)
                token_reward = c.divergence.reward(student, scores) * mask
            else:
                token_reward = self.by_micro_batch(out, rows, scores, c.divergence.reward) * mask
            self._log("opd/divergence_reward", float(token_reward.sum() / mask.sum().clamp(min=1)))
            if c.advantage.needs_token_value() or (w_r != 0 and c.div_reward_to_go):
                token_value = self.by_micro_batch(out, rows, scores,
                                                  lambda s, t: c.divergence.per_token(s, t).value) * mask
        logps = None
        if c.advantage.needs_logps:
            logps = self.student_token_logps(out)
        ref_logps = None
        if c.advantage.reference() is not None:
            ref_logps = self.reference_logps(c.advantage.reference(), self.teacher_batch(out, rows),
                                             c.advantage.name).token_logps
        inputs = AdvantageInputs(rewards=rewards, num_generations=num_gen, local=local, mask=mask,
                                 token_reward=token_reward if c.advantage.needs_token_reward else None,
                                 logps=logps, ref_logps=ref_logps, step=self.state.global_step,
                                 token_value=token_value if c.advantage.needs_token_value() else None,
                                 max_steps=self.state.max_steps or 0)
        if self._has_rewards or c.advantage.needs_token_reward:
            advantages = c.advantage.compute(inputs).to(device)
            if advantages.shape[0] != B:
                raise OPDError(f"advantage {c.advantage.name!r} returned {advantages.shape[0]} values for {B} completions")
        else:
            advantages = torch.zeros(B, device=device)
        excluded = c.advantage.excluded(inputs) if self._has_rewards and mode == "train" else None
        if excluded is not None and bool(excluded.any()):  # e.g. MC-GRPO's median pivots leave every loss term
            self.drop_rows(out, ~excluded.to(device))
            mask = loss_mask(out)
            self._log("opd/excluded_completion_frac", float(excluded.float().mean()))
        if self._has_rewards and self._needs_teacher():  # diag/order_discordant_frac: the groups' rewards
            self.diagnostics.start_generation_batch(mode, out, rewards, local, num_gen)
        if self._has_rewards:
            degenerate = degenerate_groups(rewards, num_gen)
            self._log("opd/degenerate_group_frac", len(degenerate) / max(rewards.numel() // num_gen, 1))
            feedback = self.sampler_feedback(out, rows, rewards, num_gen) if mode == "train" else None
            if feedback is not None:
                c.sampler.observe(feedback)
                for key, value in (getattr(c.sampler, "last_stats", None) or {}).items():
                    self._log(f"sampler/{c.sampler.name}/{key}", float(value))
            if degenerate:
                self.pm.call("opd_degenerate_groups", trainer=self, groups=degenerate, rewards=rewards)
                if feedback is not None:
                    grouped = rewards.view(-1, num_gen)
                    c.sampler.on_degenerate_groups([feedback.rows[g * num_gen] for g in degenerate],
                                                   grouped[degenerate], self.state.global_step)
            if mode == "train" and getattr(self.args, "degenerate_groups", "keep") == "drop":
                self.drop_groups(out, degenerate, num_gen, local)
                mask = loss_mask(out)
        if w_r != 0 and token_reward is not None:
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1) * mask
            if c.div_reward_to_go:  # the sequence-level divergence's gradient (advantages.base.reward_to_go)
                token_reward = reward_to_go(token_reward, mask, token_value)
            advantages = advantages + w_r * token_reward
        return advantages

    def unscore_truncated(self, out: dict[str, Any], rewards: torch.Tensor) -> torch.Tensor:
        """``truncated_completions: mask_reward``: the ``(N,)`` global rewards with every completion cut at the
        length cap unscored (NaN), as if no reward function applied to it: the estimator gives it no task-reward
        advantage and leaves it out of its group's baseline; its tokens stay in every loss term."""
        cut = truncated_rows(out["completion_ids"], out["completion_mask"],
                             [*self.eos_token_ids, self._tokenizer.pad_token_id])
        if self.accelerator.num_processes > 1:
            cut = self.accelerator.gather(cut.to(device=rewards.device, dtype=torch.int32)).bool()
        self._log("opd/reward_masked_truncated_frac", float(cut.float().mean()))
        return torch.where(cut.to(rewards.device), torch.full_like(rewards, float("nan")), rewards)

    def sampler_feedback(self, out: dict[str, Any], rows: list[dict[str, Any]], rewards: torch.Tensor,
                         num_gen: int) -> SamplerFeedback:
        """The generation batch's outcome for the sampler: every rank's rows, guidance and completion texts
        (gathered, in generation order, so every rank's sampler sees the same) with the global rewards."""
        from accelerate.utils import gather_object

        guided = self.step.guided
        guidance = list(guided.guidance) if guided is not None else [None] * len(rows)
        texts = self._tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
        if self.accelerator.num_processes > 1:
            rows, guidance, texts = gather_object(list(rows)), gather_object(guidance), gather_object(texts)
        guidance = [g if g is not None else Guidance() for g in guidance]
        return SamplerFeedback(rows=list(rows), rewards=rewards.detach().float().cpu(), guidance=guidance,
                               completions=list(texts), num_generations=num_gen, step=self.state.global_step)

    def drop_groups(self, out: dict[str, Any], groups: list[int], num_gen: int, local: slice) -> None:
        """Remove the completions of ``groups`` (global group indices) from every loss term of this step."""
        B = out["completion_ids"].shape[0]
        keep = torch.ones(B, dtype=torch.bool, device=out["completion_ids"].device)
        for g in groups:
            lo, hi = max(g * num_gen - local.start, 0), min((g + 1) * num_gen - local.start, B)
            if lo < hi:
                keep[lo:hi] = False
        self.drop_rows(out, keep)
        self._log("opd/dropped_completion_frac", float((~keep).float().mean()))

    def drop_rows(self, out: dict[str, Any], keep: torch.Tensor) -> None:
        """Remove the completions where ``keep`` (``(B,)`` bool) is False from every loss term of this step: their
        tokens leave ``completion_mask`` and the token count ``num_items_in_batch`` (so nothing else is diluted)."""
        out["completion_mask"] = out["completion_mask"] * keep.unsqueeze(1).to(out["completion_mask"].dtype)
        if "num_items_in_batch" in out:
            out["num_items_in_batch"] = self.accelerator.gather(loss_mask(out).sum()).sum()

    # ------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if self.fused_policy_head(model, compute_aux_loss, kwargs):
            logps, entropies, aux = self.fused_policy_logps(model, input_ids, attention_mask, logits_to_keep,
                                                            batch_size, compute_entropy)
        else:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if self.step.capture and torch.is_grad_enabled():
            self.step.captured_logps = logps
            self.step.captured_entropy = None if entropies is None else entropies.detach()
            self.step.capture = False
        return logps, entropies, aux

    def fused_policy_head(self, model: Any, compute_aux_loss: bool, extra: dict[str, Any]) -> bool:
        """Whether TRL's log-prob forwards of the policy (its policy-gradient term, ``old_per_token_logps``) run
        through the divergence's fused lm head too (``fused_lm_head: true``): for the trained model, text only, no
        MoE aux loss and no entropy bonus (TRL's own kernel differentiates the entropy; this one does not)."""
        divergence = self.components.divergence
        if divergence is None or not divergence.uses_hidden_states():
            return False
        if compute_aux_loss or any(v is not None for v in extra.values()) or self._entropy_bonus_enabled:
            return False
        unwrap = self.accelerator.unwrap_model
        return unwrap(model) is unwrap(self.model)

    def fused_chunk(self) -> int:
        """Tokens per chunk of every fused lm-head computation (student and teacher): the divergence's
        ``chunk_size``."""
        return getattr(self.components.divergence.params, "chunk_size", 0) or 256

    def fused_policy_logps(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           logits_to_keep: int, batch_size: int | None, compute_entropy: bool) -> tuple:
        """TRL's ``(log-probs, entropies, aux)`` of the last ``logits_to_keep`` tokens, ``batch_size`` rows per
        forward, from the final hidden states and the lm head in chunks of the divergence's ``chunk_size`` tokens:
        no ``(b, T, V)`` logits (TRL's kernel takes up to 32,768 positions, prompt included, per tile). When the
        next divergence term will need them, the micro-batch's hidden states are kept for it (one forward serves
        both terms)."""
        chunk = self.fused_chunk()
        size = batch_size or input_ids.shape[0]
        unwrapped, outs = self.accelerator.unwrap_model(model), []
        for lo in range(0, input_ids.shape[0], size):
            ids, am = input_ids[lo:lo + size], attention_mask[lo:lo + size]
            completion = ids[:, -logits_to_keep:]
            outs.append(fused_outputs(model, unwrapped, ids, am, completion, am[:, -logits_to_keep:].float(),
                                      self.temperature, chunk, entropy=compute_entropy))
        if self.step.capture and torch.is_grad_enabled() and len(outs) == 1:
            self.step.captured_outputs = outs[0]
        logps = torch.cat([o.token_logps for o in outs]) if len(outs) > 1 else outs[0].token_logps
        entropies = None if not compute_entropy else torch.cat([o.entropy for o in outs])
        return logps, entropies, None

    def student_outputs(self, model: Any, inputs: dict[str, Any], *, grad: bool = True) -> StudentOutputs:
        """The student's per-token log-probs (and logits when the divergence needs the full vocabulary).

        A divergence with ``fused_lm_head`` (:meth:`~opd_plugins.divergences.base.Divergence.uses_hidden_states`)
        gets no logits but the final hidden states and the lm head; the token log-probs are then computed chunk by
        chunk from those too, so no ``(B, T, V)`` tensor is made here (:mod:`opd_plugins.trainers.student`)."""
        out = self._student_outputs(model, inputs, grad=grad)
        out.old_token_logps = inputs.get("old_per_token_logps")  # tokens sampled by an older policy: ρ_t corrects
        return out

    def _student_outputs(self, model: Any, inputs: dict[str, Any], *, grad: bool) -> StudentOutputs:
        mask = loss_mask(inputs)
        divergence = self.components.divergence
        full = divergence is not None and divergence.requires() in ("topk", "full")  # both read student logits
        fused = divergence is not None and divergence.uses_hidden_states()
        entropy = any(tw.needs_entropy() for tw in self.components.token_weighting)
        captured = self.step.captured_outputs
        self.step.captured_outputs = None
        if grad and fused and captured is not None and (captured.entropy is not None or not entropy):
            self.step.take_captured()  # the same forward's log-probs: the hidden states carry them
            return StudentOutputs(token_logps=captured.token_logps, mask=mask, hidden=captured.hidden,
                                  lm_head=captured.lm_head, entropy=captured.entropy)
        if grad and not full and not fused and self.step.captured_logps is not None:
            logps, captured_entropy = self.step.take_captured()
            if captured_entropy is not None or not entropy:
                return StudentOutputs(token_logps=logps, mask=mask, entropy=captured_entropy)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if fused:
                chunk = self.fused_chunk()
                return fused_outputs(model, self.accelerator.unwrap_model(model), ids, am, inputs["completion_ids"],
                                     mask, self.temperature, chunk, entropy=entropy)
            if full:
                return full_vocab_outputs(model, ids, am, inputs["completion_ids"], mask, self.temperature)
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, ids, am, inputs["completion_ids"].shape[1], compute_entropy=entropy)
            return StudentOutputs(token_logps=logps, mask=mask,
                                  entropy=None if entropies is None else entropies.detach())

    def _token_normalizer(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Same normalisation as TRL's ``dapo`` loss: global tokens of the generation batch, per GA window."""
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self._mode() == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _compute_loss(self, model, inputs):
        c = self.components
        w_pg = self.weight(c.pg_weight)
        w_div = self.weight(c.div_weight) if c.divergence is not None else 0.0
        terms: dict[str, torch.Tensor] = {}
        self.step.captured_logps = self.step.captured_outputs = None
        correction = inputs.get("correction_weights")
        if correction is not None:  # w ≥ 0 commutes with PPO's min: equals weighting the per-token PG loss
            inputs = {**inputs, "advantages": weight_advantages(inputs["advantages"], correction)}
        guided = "swap_behaviour_logps" in inputs or "prefix_supervised_mask" in inputs
        if w_pg != 0 or w_div == 0:
            advantages = inputs["advantages"]
            swap = _swap_rows(inputs)
            if swap is not None:  # their policy gradient is the sampler's shaped term, not TRL's clipped ratio
                keep = (~swap).to(advantages.dtype)
                inputs = {**inputs, "advantages": advantages * (keep if advantages.dim() == 1 else keep.unsqueeze(1))}
            self.step.capture = w_div != 0 or guided or TeacherScores.from_batch(inputs) is not None
            pg = super()._compute_loss(model, inputs)
            self.step.capture = False
            terms["policy_gradient"] = w_pg * pg
            if guided and self.step.captured_logps is not None:
                extra, stats = guide.guided_terms(c.sampler, self.step.captured_logps, inputs, advantages,
                                                  self._token_normalizer(inputs))
                terms.update({name: w_pg * value for name, value in extra.items()})
                for key, value in stats.items():
                    self._log(f"sampler/{key}", value)
            if w_div == 0:
                self.diagnose_without_divergence(inputs)
                self.step.captured_logps = self.step.captured_outputs = None
        if w_div != 0:
            terms["divergence"] = w_div * self.divergence_loss(model, inputs)
        version = inputs.get("policy_version")
        if version is not None:  # optimizer steps between generating a rollout and this update
            self._log("rollout/staleness", float(self.state.global_step - version.float().mean()))
        self._log("opd/weight/policy_gradient", w_pg)
        self._log("opd/weight/divergence", w_div)
        for extra in self.pm.call("opd_loss_terms", trainer=self, inputs=inputs, terms=dict(terms)):
            for name, value in (extra or {}).items():
                if name in terms:
                    raise OPDError(f"a plugin's opd_loss_terms returned term {name!r}, which already exists")
                terms[name] = value
                self._log(f"opd/loss/{name}", float(value.detach()))
        check_finite_terms(terms, self.state.global_step + 1)  # a NaN term stops the run here, naming the term
        if self.diagnostics.grad_cosine_due(self._mode(), self.state.global_step, terms):
            self.diagnostics.grad_cosine(model, terms, self.state.global_step)
        for result in self.pm.call("opd_step_metrics", trainer=self, inputs=inputs, mode=self._mode()):
            for name, value in (result or {}).items():
                self._log(name, value)
        return sum(terms.values())

    def divergence_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """Token-weighted divergence between the student and the teacher scores carried by ``inputs``."""
        c = self.components
        teacher = self.loss_time_teacher(inputs) if self.teacher_at_loss else TeacherScores.from_batch(inputs)
        if teacher is None:
            raise TeacherError("the divergence term is on but this batch carries no teacher scores")
        student = self.student_outputs(model, inputs)
        terms = c.divergence.per_token(student, teacher)
        mask = student.mask * teacher.mask
        swap = _swap_rows(inputs)
        if swap is not None:  # sampled under the hinted prompt: the divergence leaves them to the shaped term
            mask = mask * (~swap).unsqueeze(1).to(mask.dtype)
        weights = torch.ones_like(mask)
        if inputs.get("divergence_correction_weights") is not None:  # visited under μ (correction.divergence_weights)
            weights = weights * inputs["divergence_correction_weights"]
        if c.token_weighting:
            detached = StudentOutputs(student.token_logps.detach(), mask,
                                      None if student.logits is None else student.logits.detach(),
                                      entropy=student.entropy)
            for i, tw in enumerate(c.token_weighting):
                prefix = f"token_weighting.{i}."
                prepared = {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}
                weights = weights * tw.weights({**inputs, "prepared": prepared}, detached, teacher)
                tag = tw.name if [t.name for t in c.token_weighting].count(tw.name) == 1 else f"{tw.name}_{i}"
                for key, value in (getattr(tw, "last_stats", None) or {}).items():
                    self._log(f"token_weighting/{tag}/{key}", float(value))
        loss = (terms.loss * weights * mask).sum() / self._token_normalizer(inputs)
        stats = self.accelerator.reduce(torch.stack([(terms.value * mask).sum(), mask.sum()]).detach(), reduction="sum")
        self._log("opd/divergence", float(stats[0] / stats[1].clamp(min=1)))
        self.diagnostics.record(self._mode(), inputs, teacher, student.token_logps, mask, student.logits)
        return loss

    def diagnose_without_divergence(self, inputs: dict[str, Any]) -> None:
        """The ``diag/*`` metrics of a micro-batch without a divergence term whose teacher scores feed the
        advantages: the teacher's own statistics, and the order statistic from the policy-gradient forward's
        token log-probs (captured in training only). No student logits, so no agreement or overlap."""
        teacher = TeacherScores.from_batch(inputs)
        if teacher is not None:
            self.diagnostics.record(self._mode(), inputs, teacher, self.step.captured_logps,
                                    loss_mask(inputs) * teacher.mask)

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints: written to a staging directory, then published by an atomic rename (HookedTrainerMixin)
    # ------------------------------------------------------------------------------------------------------
    def checkpoint_components(self) -> dict[str, Any]:
        return self.components.named()


def no_task_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """The constant reward used when a recipe has no task reward (pure distillation)."""
    return [0.0] * len(completions)


def _checked_reward_func(func: Any, name: str) -> Any:
    """``func`` with its outputs checked: ``None`` means "not scored" (TRL's convention), but a NaN or infinite
    reward is a bug in the reward function, reported with the function's name and the row."""
    if isinstance(func, torch.nn.Module) or not callable(func):
        return func

    def check(values: Any, kwargs: dict[str, Any]) -> Any:
        for i, value in enumerate(values if values is not None else []):
            if value is not None and not math.isfinite(float(value)):
                prompt = kwargs.get("prompts", [None] * (i + 1))[i]
                text = prompt[-1].get("content") if isinstance(prompt, list) and prompt else prompt
                raise OPDError(f"reward function {name!r} returned {value} for row {i} of the generation batch "
                               f"(prompt {str(text)[:120]!r}); return None for a completion it does not score")
        return values

    if is_async_callable(func):
        async def checked_async(*args: Any, **kwargs: Any) -> Any:
            return check(await func(*args, **kwargs), kwargs)

        wrapper: Any = checked_async
    else:
        def checked(*args: Any, **kwargs: Any) -> Any:
            return check(func(*args, **kwargs), kwargs)

        wrapper = checked
    wrapper.__name__ = name
    wrapper.__wrapped__ = func
    return wrapper


def _swap_rows(batch: dict[str, Any]) -> torch.Tensor | None:
    """``(B,)`` bool: the batch's ``swap`` rows (trained on the original prompt), or None without any."""
    roles = batch.get("sampler_role")
    if roles is None:
        return None
    swap = roles == ROLES.index("swap")
    return swap if bool(swap.any()) else None


MULTIMODAL_KEYS = frozenset({"pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                             "image_position_ids", "spatial_shapes", "num_images", "num_tiles"})
"""Batch fields TRL adds for a vision-language model's images."""


def _image_columns(data: Any) -> list[str]:
    """The image fields of a dataset (its columns) or of a list of rows (those that hold an image)."""
    if data is None:
        return []
    names = getattr(data, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict
        names = sorted({n for cols in names.values() for n in cols})
    if names is not None:
        return [n for n in ("image", "images") if n in names]
    rows = data if isinstance(data, list) else []
    return sorted({k for row in rows if isinstance(row, dict) for k in ("image", "images") if row.get(k)})


def _refuse_multimodal(parts: list[str], fields: list[str], where: str) -> None:
    if parts and fields:
        raise OPDError(f"{where} carries images ({', '.join(fields)}), but {', '.join(parts)} would score the "
                       "completions as text only (the images reach only TRL's policy-gradient forward), which "
                       "silently trains on the wrong distribution. Vision-language models are supported with the "
                       "policy gradient alone for now: remove the teacher, the divergence and the correction, or "
                       "drop the image columns")


def _check_components(c: Components) -> None:
    if c.teacher is not None and c.divergence is not None:
        need = c.divergence.requires()
        if need not in c.teacher.capabilities:
            raise OPDError(
                f"divergence {c.divergence.name!r} needs {need!r} teacher scores, but teacher {c.teacher.name!r} "
                f"provides only {', '.join(sorted(c.teacher.capabilities))}"
            )


__all__ = ["OPDTrainer", "ModelLoadError"]
