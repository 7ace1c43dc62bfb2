"""Contract test suites: subclass the one for your component's kind and set ``component``.

Every check uses small random tensors or the tiny in-process model, so the whole suite runs on CPU, offline,
in seconds. Built-in components and third-party plugins run the very same checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from pydantic import ValidationError

from opd_plugins.components import KINDS, SNAKE_CASE, Component

_IMPORT_CHECKS: dict[str, str] = {}


class _WrongType:
    """A value no typed pydantic field accepts."""

    def __repr__(self) -> str:
        return "<wrong type>"


def _registry() -> Any:
    from opd_plugins.manager import get_plugin_manager

    return get_plugin_manager().registry


def build_component(cls: type[Component], params: Any = None) -> Component:
    """Build ``cls`` from ``params`` as a recipe would: through the registry of the built-in and installed plugins,
    which builds the nested components it declares (``nested_slots``). ``cls`` need not be registered."""
    from opd_plugins.errors import RecipeError

    component, problems = _registry().resolve_class(cls, params if params is not None else cls.example_params())
    if problems:
        raise RecipeError(problems, source=f"{cls.kind} {cls.name!r}")
    return component


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


class ComponentContract:
    """Checks every component passes, whatever its kind."""

    component: ClassVar[type[Component]]
    require_registered: ClassVar[bool] = True

    def make(self, **overrides: Any) -> Component:
        """An instance built from ``example_params()`` by the registry, as a recipe builds it (nested components
        included); override to add test-only setup."""
        params = self.component.example_params()
        if overrides:
            params = self.component.Params(**{**params.model_dump(), **overrides})
        return build_component(self.component, params)

    def exercised(self) -> Component:
        """An instance that has done some work, so its ``state_dict()`` is what a checkpoint of a run would hold
        (kind contracts override this; the default is a fresh instance)."""
        return self.make()

    def test_name_is_snake_case(self):
        assert isinstance(self.component.name, str) and SNAKE_CASE.match(self.component.name), self.component.name

    def test_kind_is_known(self):
        assert self.component.kind in KINDS

    def test_registered_under_its_name(self):
        from opd_plugins.manager import get_plugin_manager

        registry = get_plugin_manager().registry
        if self.component.name in registry.names(self.component.kind):
            assert registry.get(self.component.kind, self.component.name) is self.component
        else:
            assert not self.require_registered, (
                f"{self.component.kind} {self.component.name!r} is not registered by any installed plugin "
                "(set require_registered = False for an unregistered test component)"
            )

    def test_has_docstring(self):
        assert (self.component.__doc__ or "").strip()

    def test_params_forbid_unknown_keys(self):
        with pytest.raises(ValidationError):
            self.component.Params(**{**self.component.example_params().model_dump(), "not_a_param_xyz": 1})

    def test_params_round_trip_through_yaml(self):
        params = self.component.example_params()
        text = yaml.safe_dump(params.model_dump(mode="json"))
        assert self.component.Params(**yaml.safe_load(text)) == params

    def test_constructs_from_example_params(self):
        comp = self.make()
        assert isinstance(comp, self.component)

    def test_state_dict_round_trip(self):
        comp = self.exercised()
        state = comp.state_dict()
        json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
        fresh = self.make()
        fresh.load_state_dict(state)
        assert _states_equal(fresh.state_dict(), state)

    def test_example_params_pass_the_recipe_validator(self):
        """``example_params()`` written as a recipe's ``{name, params}`` is accepted by the registry's validation
        (the path a recipe takes), after a YAML round trip."""
        params = yaml.safe_load(yaml.safe_dump(self.component.example_params().model_dump(mode="json")))
        registry = _registry()
        component, problems = registry.resolve_class(self.component, params, self.component.kind)
        assert not problems, [str(p) for p in problems]
        assert isinstance(component, self.component)

    def test_wrong_typed_param_is_rejected(self):
        """Every typed param refuses a value of the wrong type with a validation error (and ``Any`` ones are
        the component's own business)."""
        example = self.component.example_params().model_dump()
        checked = []
        for name, info in self.component.Params.model_fields.items():
            if info.annotation is Any:
                continue
            with pytest.raises(ValidationError):
                self.component.Params(**{**example, name: _WrongType()})
            checked.append(name)
        assert checked or not self.component.Params.model_fields

    def test_module_import_does_not_import_vllm(self):
        module = self.component.__module__.rsplit(".", 1)[0] if "." in self.component.__module__ else self.component.__module__
        if module not in _IMPORT_CHECKS:
            code = f"import sys, importlib; importlib.import_module({module!r}); print('vllm' in sys.modules)"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # test modules too
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            _IMPORT_CHECKS[module] = out.stdout.strip()
        assert _IMPORT_CHECKS[module] == "False", f"importing {module} imports vllm"


# ---------------------------------------------------------------------------------------------------------------
# Divergences
# ---------------------------------------------------------------------------------------------------------------


def random_pair(B: int = 3, T: int = 5, V: int = 11, seed: int = 0, sharp: float = 2.0):
    """Random student logits and teacher log-probs, with tokens sampled from the student."""
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g) * sharp
    t_logps = torch.log_softmax(torch.randn(B, T, V, generator=g) * sharp, -1)
    s_probs = torch.softmax(s_logits, -1)
    tokens = torch.multinomial(s_probs.view(-1, V), 1, generator=g).view(B, T)
    return s_logits, t_logps, tokens


def make_inputs(s_logits: torch.Tensor, t_logps: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                requires_grad: bool = True):
    from opd_plugins.divergences.base import StudentOutputs
    from opd_plugins.teachers.base import TeacherScores

    s_logits = s_logits.clone().requires_grad_(requires_grad)
    mask = torch.ones(tokens.shape) if mask is None else mask
    s_logps = torch.log_softmax(s_logits, -1)
    student = StudentOutputs(token_logps=s_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), mask=mask, logits=s_logits)
    k = min(4, t_logps.shape[-1])
    top_vals, top_ids = t_logps.topk(k, -1)
    teacher = TeacherScores(
        token_logps=t_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), mask=mask.clone(), logps=t_logps,
        topk_ids=top_ids, topk_logps=top_vals, topk_mass=top_vals.exp().sum(-1),
        entropy=-(t_logps.exp() * t_logps).sum(-1),
    )
    return s_logits, student, teacher


class DivergenceContract(ComponentContract):
    """D(p, p) = 0 with zero gradient, D ≥ 0 (in expectation for sampled estimators), finite gradients,
    all-masked input gives 0, and row-chunked equals unchunked."""

    def test_zero_when_teacher_equals_student(self):
        div = self.make()
        s_logits, t_logps, tokens = random_pair()
        s_logits, student, teacher = make_inputs(s_logits, torch.log_softmax(s_logits, -1).detach(), tokens)
        terms = div.per_token(student, teacher)
        assert torch.allclose(terms.value, torch.zeros_like(terms.value), atol=1e-5)
        terms.loss.sum().backward()
        assert s_logits.grad is not None and torch.allclose(s_logits.grad, torch.zeros_like(s_logits.grad), atol=1e-5)

    def test_non_negative(self):
        div = self.make()
        s_logits, t_logps, _ = random_pair(B=2, T=3, V=7, seed=1)
        V = s_logits.shape[-1]
        if div.requires() == "full":
            _, student, teacher = make_inputs(s_logits, t_logps, torch.zeros(2, 3, dtype=torch.long))
            assert (div.per_token(student, teacher).value >= -1e-6).all()
            return
        # Sampled estimators: the exact expectation over the sampled token, Σ_x p_s(x)·value(x), is ≥ 0.
        expected = torch.zeros(2, 3)
        s_probs = torch.softmax(s_logits, -1)
        for x in range(V):
            tokens = torch.full((2, 3), x, dtype=torch.long)
            _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
            expected += s_probs[..., x] * div.per_token(student, teacher).value
        assert (expected >= -1e-5).all(), expected

    def test_finite_gradients(self):
        div = self.make()
        s_logits, t_logps, tokens = random_pair(seed=2)
        s_logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        div.per_token(student, teacher).loss.sum().backward()
        assert s_logits.grad is not None and torch.isfinite(s_logits.grad).all()
        assert s_logits.grad.abs().sum() > 0

    def test_all_masked_gives_zero(self):
        div = self.make()
        s_logits, t_logps, tokens = random_pair(seed=3)
        _, student, teacher = make_inputs(s_logits, t_logps, tokens, mask=torch.zeros(tokens.shape))
        terms = div.per_token(student, teacher)
        assert float(terms.loss.detach().abs().sum()) == 0.0 and float(terms.value.abs().sum()) == 0.0

    def test_chunked_equals_unchunked(self):
        div = self.make()
        s_logits, t_logps, tokens = random_pair(B=4, seed=4)
        _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
        whole = div.per_token(student, teacher).value
        parts = []
        for rows in (slice(0, 1), slice(1, 4)):
            _, s, t = make_inputs(s_logits[rows], t_logps[rows], tokens[rows], requires_grad=False)
            parts.append(div.per_token(s, t).value)
        assert torch.allclose(whole, torch.cat(parts), atol=1e-6)

    def test_reward_depends_on_sampled_token(self):
        div = self.make()
        s_logits, t_logps, tokens = random_pair(seed=5)
        _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
        _, student2, teacher2 = make_inputs(s_logits, t_logps, (tokens + 1) % s_logits.shape[-1], requires_grad=False)
        r1, r2 = div.reward(student, teacher), div.reward(student2, teacher2)
        assert r1.shape == tokens.shape and torch.isfinite(r1).all()
        assert not torch.allclose(r1, r2), "a per-token reward that ignores the sampled token has no policy gradient"


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------


class AdvantageContract(ComponentContract):
    """Output shapes and finiteness, including zero-variance groups, unscored (NaN) rewards, and a rank's slice.

    Inputs always carry a mask, a per-token teacher reward and policy log-probs, so estimators that need them
    are exercised too.
    """

    num_generations: ClassVar[int] = 4
    completion_len: ClassVar[int] = 5

    def inputs(self, rewards: torch.Tensor, G: int, local: slice | None = None):
        from opd_plugins.advantages.base import AdvantageInputs

        g = torch.Generator().manual_seed(0)
        n = rewards.shape[0] if local is None else len(range(*local.indices(rewards.shape[0])))
        mask = torch.ones(n, self.completion_len)
        mask[0, -2:] = 0
        return AdvantageInputs(
            rewards=rewards, num_generations=G, local=local, mask=mask,
            token_reward=-torch.rand(n, self.completion_len, generator=g) * mask,
            logps=-torch.rand(n, self.completion_len, generator=g) * 3 * mask, step=3, max_steps=10,
        )

    def _G(self, est) -> int:
        return max(self.num_generations, est.min_generations)

    def test_shape_and_finite(self):
        est = self.make()
        G = self._G(est)
        rewards = torch.rand(3 * G, generator=torch.Generator().manual_seed(0))
        adv = est.compute(self.inputs(rewards, G))
        assert adv.shape[0] == rewards.shape[0] and adv.dim() in (1, 2)
        if adv.dim() == 2:
            assert adv.shape[1] == self.completion_len
        assert torch.isfinite(adv).all()

    def test_local_slice(self):
        est = self.make()
        G = self._G(est)
        rewards = torch.rand(4 * G, generator=torch.Generator().manual_seed(1))
        local = slice(2 * G, 4 * G)
        adv = est.compute(self.inputs(rewards, G, local))
        assert adv.shape[0] == 2 * G and torch.isfinite(adv).all()

    def test_zero_variance_group_is_finite(self):
        est = self.make()
        G = self._G(est)
        rewards = torch.cat([torch.ones(G), torch.zeros(G), torch.arange(G, dtype=torch.float32)])
        assert torch.isfinite(est.compute(self.inputs(rewards, G))).all()

    def test_unscored_rows_are_finite(self):
        est = self.make()
        G = self._G(est)
        rewards = torch.rand(2 * G)
        rewards[0] = float("nan")
        assert torch.isfinite(est.compute(self.inputs(rewards, G))).all()


# ---------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------


def fake_context(model: Any, tokenizer: Any, temperature: float = 1.0, **fields: Any) -> Any:
    """A :class:`~opd_plugins.context.SetupContext` without a trainer, for testing components on their own: the
    model and tokenizer, CPU, the built-in and installed registry; any other field may be given
    (``log=``, ``progress=``, ``on_optimizer_step=``, ``peers=``, ...)."""
    from opd_plugins.context import SetupContext

    fields.setdefault("registry", _registry())
    return SetupContext(model=model, tokenizer=tokenizer, device=torch.device("cpu"), temperature=temperature,
                        **fields)


fake_trainer = fake_context  # the name earlier releases used


def teacher_batch(tokenizer: Any, n: int = 3, completion_len: int = 6, seed: int = 0):
    """A left-padded prompt batch with right-padded random completions and rows carrying answer/hint."""
    from opd_plugins.teachers.base import TeacherBatch

    g = torch.Generator().manual_seed(seed)
    questions = [f"What is {i} + {i + 3}?" for i in range(n)]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: 4 + 3 * i] for i, t in enumerate(texts)]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    prompt_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    completion_ids = torch.randint(5, len(tokenizer), (n, completion_len), generator=g)
    completion_mask = torch.ones(n, completion_len, dtype=torch.long)
    completion_mask[0, completion_len // 2:] = 0
    rows = [{"prompt": p, "answer": str(2 * i + 3), "hint": f"(Hint: the correct answer is {2 * i + 3}.)"}
            for i, p in enumerate(prompts)]
    return TeacherBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, prompts=prompts, rows=rows)


def point_models_at(params: Any, model_dir: str) -> Any:
    """``params`` (a mapping) with every ``model`` entry, in nested ``{name, params}`` specs too, replaced by
    ``model_dir``."""
    if isinstance(params, dict):
        return {k: (model_dir if k == "model" and isinstance(v, str) else point_models_at(v, model_dir))
                for k, v in params.items()}
    if isinstance(params, list):
        return [point_models_at(v, model_dir) for v in params]
    return params


def offline_cache_contract_params(model_dir: str) -> dict[str, Any]:
    """An ``offline_cache`` teacher over a cache of :func:`teacher_batch` (made with the suite's in-memory tokenizer)
    scored by the tiny model in ``model_dir``; written next to the model on first use, reused after."""
    from opd_plugins.teachers.cache.writer import cache_teacher_batch
    from opd_plugins.testing.models import build_tokenizer

    out = Path(model_dir) / ".offline_cache_contract"
    cache_teacher_batch(teacher_batch(build_tokenizer()), model_dir, out, top_k=4)
    return {"path": str(out), "teacher": model_dir}


CONTRACT_PARAMS: dict[tuple[str, str], Callable[[str], dict[str, Any]]] = {
    ("teacher", "offline_cache"): offline_cache_contract_params,
    ("teacher", "blackbox_text"): lambda model_dir: {"source": "local_model", "model": model_dir, "max_tokens": 4},
}
"""Built-in teachers whose contract checks need more than their ``model`` pointed at the tiny model."""


class TeacherContract(ComponentContract):
    """Log-prob shape, dtype, masking and token alignment (batched scores equal each row scored alone).

    :meth:`contract_params` points every ``model`` param (nested teachers' too) at the tiny test model
    (``opd_tiny_model_dir``); override it in your subclass when your teacher needs something else (a cache, a
    server) to score the suite's batch.
    """

    def contract_params(self, model_dir: str) -> dict[str, Any]:
        """Params for the scoring checks, from ``example_params()``."""
        special = CONTRACT_PARAMS.get((self.component.kind, self.component.name))
        if special is not None and self.component.__module__.startswith("opd_plugins."):
            return special(model_dir)
        return point_models_at(self.component.example_params().model_dump(mode="json"), model_dir)

    @pytest.fixture
    def teacher(self, opd_tiny_model_dir, opd_tokenizer):
        from opd_plugins.testing.models import build_tiny_model

        comp = build_component(self.component, self.contract_params(str(opd_tiny_model_dir)))
        comp.setup(fake_context(build_tiny_model(opd_tokenizer, seed=0), opd_tokenizer))
        return comp

    def test_logprob_shape_dtype_and_mask(self, teacher, opd_tokenizer):
        batch = teacher_batch(opd_tokenizer)
        scores = teacher.score(batch, "sampled")
        assert scores.token_logps.shape == batch.completion_ids.shape
        assert scores.token_logps.dtype == torch.float32
        valid = batch.completion_mask.bool()
        assert torch.isfinite(scores.token_logps).all()
        assert (scores.token_logps[valid] <= 1e-6).all()
        assert (scores.token_logps[~valid] == 0).all()

    def test_token_alignment_is_padding_invariant(self, teacher, opd_tokenizer):
        batch = teacher_batch(opd_tokenizer)
        together = teacher.score(batch, "sampled").token_logps
        for i in range(batch.completion_ids.shape[0]):
            keep = batch.prompt_mask[i].bool()
            from opd_plugins.teachers.base import TeacherBatch

            single = TeacherBatch(batch.prompt_ids[i:i + 1, keep], batch.prompt_mask[i:i + 1, keep],
                                  batch.completion_ids[i:i + 1], batch.completion_mask[i:i + 1],
                                  prompts=batch.prompts[i:i + 1], rows=batch.rows[i:i + 1])
            alone = teacher.score(single, "sampled").token_logps
            m = batch.completion_mask[i].bool()
            assert torch.allclose(together[i][m], alone[0][m], atol=1e-4), (i, together[i], alone[0])

    def test_declared_capabilities_are_served(self, teacher, opd_tokenizer):
        batch = teacher_batch(opd_tokenizer)
        for want in sorted(teacher.capabilities):
            scores = teacher.score(batch, want)
            if want == "full":
                assert scores.logps is not None and scores.logps.shape[:2] == batch.completion_ids.shape
            if want == "topk":
                assert scores.topk_logps is not None and scores.topk_ids.shape == scores.topk_logps.shape


# ---------------------------------------------------------------------------------------------------------------
# Samplers, rollouts, schedules, token weightings
# ---------------------------------------------------------------------------------------------------------------


class SamplerContract(ComponentContract):
    """One consistent guidance per rollout, only of the declared roles; deterministic for a fixed step and state;
    learns from feedback (including all-fail groups) without error; state survives a round trip."""

    @pytest.fixture(autouse=True)
    def _context(self, opd_tokenizer):
        from opd_plugins.testing.models import build_tiny_model

        self._ctx = fake_context(build_tiny_model(opd_tokenizer, seed=0), opd_tokenizer)

    def make(self, **overrides: Any) -> Component:
        sampler = super().make(**overrides)
        sampler.setup(self._ctx)  # a sampler that generates (self_hint) gets the tiny model
        return sampler

    @staticmethod
    def batch():
        prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(2) for _ in range(2)]
        rows = [{"prompt": p, "answer": str(i // 2 + 1), "hint": f"(Hint: {i // 2 + 1})",
                 "solution": f"{i // 2} + 1 = {i // 2 + 1}. The answer is {i // 2 + 1}."}
                for i, p in enumerate(prompts)]
        return prompts, rows

    def test_deterministic_and_length_preserving(self):
        from opd_plugins.samplers.base import SamplerOutput

        prompts, rows = self.batch()
        a = self.make().prepare(prompts, rows, step=3)
        b = self.make().prepare(prompts, rows, step=3)
        assert isinstance(a, SamplerOutput) and len(a.guidance) == len(prompts)
        assert a.guidance == b.guidance
        for g in a.guidance:
            assert not g.problems() and g.role in self.component.roles | {"none"}

    def test_observes_feedback_and_round_trips_its_state(self):
        from opd_plugins.samplers.base import SamplerFeedback

        prompts, rows = self.batch()
        sampler = self.make()
        for step, value in enumerate([0.0, 0.0, 1.0]):  # all-fail twice, then all-pass
            out = sampler.prepare(prompts, rows, step=step)
            rewards = torch.full((len(rows),), value)
            sampler.observe(SamplerFeedback(rows=rows, rewards=rewards, guidance=out.guidance,
                                            completions=["1"] * len(rows), num_generations=2, step=step))
            sampler.on_degenerate_groups(rows[::2], rewards.view(-1, 2), step)
        restored = self.make()
        restored.load_state_dict(sampler.state_dict())
        assert restored.prepare(prompts, rows, step=5).guidance == sampler.prepare(prompts, rows, step=5).guidance


class RolloutContract(ComponentContract):
    """Declares its precision. (Generation itself is exercised by the end-to-end trainer tests.)"""

    def test_declares_precision(self):
        assert isinstance(self.component.precision, str) and self.component.precision


class ScheduleContract(ComponentContract):
    """Finite and deterministic over a whole run."""

    def test_finite_and_deterministic(self):
        a, b = self.make(), self.make()
        values = [a.value(s, 50) for s in range(51)]
        assert all(v == v and abs(v) != float("inf") for v in values)
        assert values == [b.value(s, 50) for s in range(51)]


class TokenWeightingContract(ComponentContract):
    """Weights of shape (B, T), non-negative and finite."""

    def test_weights_shape_and_sign(self):
        s_logits, t_logps, tokens = random_pair(seed=6)
        _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
        inputs = {"completion_ids": tokens, "completion_mask": torch.ones_like(tokens),
                  "advantages": torch.randn(tokens.shape[0]), "rewards": torch.rand(tokens.shape[0])}
        w = self.make().weights(inputs, student, teacher)
        assert w.shape == tokens.shape and torch.isfinite(w).all() and (w >= 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Prompt selections
# ---------------------------------------------------------------------------------------------------------------


def oracle_rewards(indices: list[int], n_prompts: int, num_generations: int, generator: torch.Generator) -> torch.Tensor:
    """``(len(indices), G)`` Bernoulli rewards of prompts whose success probability is ``i / (n_prompts − 1)``."""
    p = torch.tensor(indices, dtype=torch.float64) / max(n_prompts - 1, 1)
    return (torch.rand(len(indices), num_generations, generator=generator, dtype=torch.float64) < p[:, None]).double()


class PromptSelectionContract(ComponentContract):
    """``select`` returns k distinct in-range indices, is deterministic for equal state, seed and step, and gives
    the same future chunks after a checkpoint round trip; ``observe`` takes NaN (unscored) rewards."""

    n_prompts: ClassVar[int] = 12
    k: ClassVar[int] = 4

    def run(self, selection: Any, chunks: int, seed: int = 0, start: int = 0) -> list[list[int]]:
        """``chunks`` rounds of select → oracle rewards (one NaN in each group) → observe; the chunks chosen."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for step in range(start, start + chunks):
            chosen = selection.select(self.k, self.n_prompts, step)
            rewards = oracle_rewards(chosen, self.n_prompts, 4, gen)
            rewards[:, -1] = float("nan")
            selection.observe(chosen, rewards, step)
            out.append(chosen)
        return out

    def exercised(self) -> Component:
        selection = self.make()
        self.run(selection, 5)
        return selection

    def test_selects_k_distinct_in_range(self):
        selection = self.make()
        for chosen in self.run(selection, 8):
            assert len(chosen) == self.k == len(set(chosen)) and all(isinstance(i, int) for i in chosen)
            assert all(0 <= i < self.n_prompts for i in chosen)
        assert all(isinstance(v, float) for v in selection.last_stats.values()), selection.last_stats

    def test_deterministic_for_equal_state_seed_and_step(self):
        assert self.run(self.make(), 6) == self.run(self.make(), 6)
        a, b = self.exercised(), self.exercised()
        assert a.select(self.k, self.n_prompts, 7) == b.select(self.k, self.n_prompts, 7)

    def test_checkpoint_round_trip_gives_the_same_future_chunks(self, tmp_path):
        from opd_plugins.trainers.state import load_component_states, save_component_states

        selection = self.exercised()
        save_component_states(str(tmp_path), {"prompt_selection": selection})
        restored = self.make()
        load_component_states(str(tmp_path), {"prompt_selection": restored})
        assert self.run(restored, 6, seed=1, start=5) == self.run(selection, 6, seed=1, start=5)

    def test_observe_accepts_unscored_rewards(self):
        selection = self.make()
        chosen = selection.select(self.k, self.n_prompts, 0)
        rewards = torch.full((self.k, 4), float("nan"))
        rewards[0, :2] = torch.tensor([0.0, 1.0])
        selection.observe(chosen, rewards, 0)
        again = selection.select(self.k, self.n_prompts, 1)
        assert len(set(again)) == self.k and all(0 <= i < self.n_prompts for i in again)


# ---------------------------------------------------------------------------------------------------------------
# Text-only teachers and preference objectives (SODA)
# ---------------------------------------------------------------------------------------------------------------
# A text-only teacher (capabilities {"text"}) returns responses, never token log-probs: the token-level contract above
# cannot apply to it by design. It gets this contract instead, which checks what it does serve.


class TextTeacherContract(ComponentContract):
    """``generate`` returns one string per prompt (conversational or plain) in order; ``score`` is a clear error.

    Like :class:`TeacherContract`, a ``model`` param is pointed at the tiny test model (:meth:`contract_params`).
    """

    teacher = TeacherContract.teacher
    contract_params = TeacherContract.contract_params

    def test_declares_text(self):
        assert "text" in self.component.capabilities

    def test_generates_one_string_per_prompt(self, teacher, opd_tokenizer):
        batch = teacher_batch(opd_tokenizer)
        prompts = [*batch.prompts, "What is 2 + 2?"]
        rows = [*batch.rows, {"prompt": "What is 2 + 2?", "answer": "4", "hint": "(Hint: the correct answer is 4.)"}]
        out = teacher.generate(prompts, rows)
        assert isinstance(out, list) and len(out) == len(prompts) and all(isinstance(t, str) for t in out)

    def test_score_is_a_clear_error(self, teacher, opd_tokenizer):
        from opd_plugins.errors import OPDError

        with pytest.raises(OPDError, match="text"):
            teacher.score(teacher_batch(opd_tokenizer), "sampled")


# ---------------------------------------------------------------------------------------------------------------
# Tasks and trainer variants
# ---------------------------------------------------------------------------------------------------------------


class TaskContract(ComponentContract):
    """A task builds the standard columns deterministically, keeps train and eval apart, and scores its own
    reference answers 1.0 (a task that only scores a dataset's rows, ``builds_prompts = False``, is checked on
    the reward alone)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("prompt", "answer", "hint", "task", "metadata", "solution")

    def test_builds_standard_columns_deterministically(self):
        from opd_plugins.errors import DataError

        task = self.make()
        if not task.builds_prompts:  # it only scores a dataset's rows: asking it for prompts is a clear error
            with pytest.raises(DataError):
                task.build("train", 6, 0)
            return
        train = task.build("train", 6, 0)
        assert list(train.column_names) == list(self.COLUMNS) and len(train) == 6
        assert train.to_list() == self.make().build("train", 6, 0).to_list()
        evald = task.build("eval", 6, 0)
        assert not {str(p) for p in train["prompt"]} & {str(p) for p in evald["prompt"]}

    def test_reference_answers_score_one_and_a_wrong_one_zero(self):
        task = self.make()
        if task.builds_prompts:
            rows = task.build("train", 4, 0).to_list()
        else:
            rows = [{"answer": "48 + 24 = 72\n#### 72", "metadata": None}]
        for row in rows:
            assert task.score(row["answer"], row["answer"], row.get("metadata")) == 1.0
            assert task.score("no answer here", row["answer"], row.get("metadata")) == 0.0


class TrainerContract(ComponentContract):
    """A trainer variant names the recipe sections it reads and the lifecycle hooks it calls (real hooks)."""

    def test_declares_sections_and_hooks(self):
        from opd_plugins import hookspecs
        from opd_plugins.variants import SECTIONS

        variant = self.make()
        assert set(variant.sections) <= set(SECTIONS), set(variant.sections) - set(SECTIONS)
        assert set(variant.lifecycle_hooks) <= set(hookspecs.LIFECYCLE_HOOKS)
        assert isinstance(variant.unused_reason, str) and variant.unused_reason

    def test_validation_answers_without_a_recipe(self):
        assert isinstance(self.make().arg_problems({}), list)


CONTRACTS: dict[str, type[ComponentContract]] = {
    "teacher": TeacherContract, "divergence": DivergenceContract, "advantage": AdvantageContract,
    "sampler": SamplerContract, "rollout": RolloutContract, "schedule": ScheduleContract,
    "token_weighting": TokenWeightingContract, "task": TaskContract, "trainer": TrainerContract,
    "prompt_selection": PromptSelectionContract,
}


def contract_for(cls: type[Component]) -> type[ComponentContract]:
    """The contract suite for a component class's kind (text-only teachers get theirs)."""
    if cls.kind == "teacher" and "text" in cls.capabilities and not set(cls.capabilities) & {"sampled", "topk", "full"}:
        return TextTeacherContract
    return CONTRACTS[cls.kind]
