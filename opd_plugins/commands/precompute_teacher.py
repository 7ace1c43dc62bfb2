"""``opd-plugins precompute-teacher``: score a fixed rollout set with the recipe's teacher into an offline cache.

Reads rollouts (``prompt`` + ``completion`` columns), tokenizes them exactly as the trainer will (the recipe
model's tokenizer and chat template, with the generation prompt), scores every completion token with the
recipe's local teacher (``hf_model``, through its own scoring code) and writes a cache directory that the
``offline_cache`` teacher and the ``replay`` rollout backend read (format: :mod:`opd_plugins.teachers.cache.format`).
Running the same command again finishes an interrupted cache.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from opd_plugins.errors import OPDError
from opd_plugins.teachers.cache.writer import TOPK_DTYPES, cache_header, load_scorer, tokenize_rollouts, write_cache


def precompute_teacher(recipe: Any, pm: Any = None, *, rollouts: Any, out_dir: str | os.PathLike,
                       shard_size: int = 256, top_k: int = 64, topk_dtype: str = "float16", append_eos: bool = True,
                       progress: bool = True, on_shard: Callable[[int], None] | None = None,
                       provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score a rollout set with the recipe's teacher and write (or finish) a teacher cache; returns the manifest.

    :param recipe: a validated :class:`~opd_plugins.recipe.schema.Recipe`. Its ``teacher`` is ``hf_model`` (used
        with its params, ``top_k`` replaced by ``top_k``), or ``offline_cache`` (its ``teacher`` is loaded as an
        ``hf_model``). Its model's tokenizer, ``chat_template_kwargs``, ``max_completion_length`` (completions are
        cut there, as generation would) and temperature are used.
    :param rollouts: a local file or directory (``.jsonl``/``.json``/``.parquet``/``.csv``, a
        ``save_to_disk`` directory), or a dataset-source mapping (see :class:`~opd_plugins.data.loading.DatasetSource`),
        with ``prompt`` (chat messages or text) and ``completion`` (text) columns; an optional ``completion_ids``
        column (token ids) is used verbatim instead of re-tokenizing ``completion``.
    :param out_dir: the cache directory (created; finished shards in it are reused).
    :param shard_size: rows per shard.
    :param top_k: teacher top-k stored per token (capped at the vocabulary size).
    :param topk_dtype: ``float16`` (half the space; |error| ≤ |logp|·2⁻¹¹) or ``float32`` for the top-k log-probs.
        Sampled-token log-probs and entropies are always float32.
    :param append_eos: end each completion with the tokenizer's eos token unless it already does.
    :param on_shard: called with each shard's index after it is written and listed (progress hooks, tests).
    :param provenance: recorded in the manifest: ``sft_teacher`` (the model whose outputs the student was
        fine-tuned on; the ``offline_cache`` teacher requires it to be the OPD teacher), ``sft_data``,
        ``rollouts_from`` (see :func:`~opd_plugins.teachers.cache.writer.cache_header`).
    """
    from opd_plugins.data.loading import DatasetSource, load_source
    from opd_plugins.models import check_vocab_compatible, load_tokenizer, resolve_model_path
    from opd_plugins.runs.opd import build_config

    if pm is None:
        from opd_plugins.manager import get_plugin_manager

        pm = get_plugin_manager()
    tparams = _teacher_params(recipe, pm)
    config = build_config(recipe)
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    src = rollouts if isinstance(rollouts, DatasetSource) else DatasetSource.model_validate(
        {"path": str(rollouts)} if isinstance(rollouts, (str, os.PathLike)) else rollouts)
    ds = load_source(src, required=("prompt", "completion"))
    examples = tokenize_rollouts(ds, tokenizer, chat_template_kwargs=config.chat_template_kwargs or {},
                                 max_completion_length=config.max_completion_length, append_eos=append_eos)
    scorer, teacher_tokenizer, weights = load_scorer(tparams, pm, temperature=tparams.temperature or config.temperature)
    student_vocab = _config_vocab_size(resolve_model_path(recipe.model.name_or_path), recipe.model.trust_remote_code)
    check_vocab_compatible(tokenizer, teacher_tokenizer, student_vocab, scorer.model.config.get_text_config().vocab_size,
                           recipe.model.name_or_path, tparams.model)
    header = cache_header(tparams.model, weights, scorer, tokenizer, recipe.model.name_or_path, src.describe(),
                     tokenization={"chat_template_kwargs": config.chat_template_kwargs or {},
                                   "max_completion_length": config.max_completion_length, "append_eos": append_eos},
                          provenance=provenance)
    return write_cache(examples, out_dir, scorer=scorer, header=header, shard_size=shard_size, top_k=top_k,
                       topk_dtype=topk_dtype, progress=progress, on_shard=on_shard)

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``opd-plugins precompute-teacher`` arguments."""
    p.add_argument("recipe", help="recipe YAML: its model's tokenizer, its teacher (hf_model, or offline_cache's "
                                  "`teacher`), max_completion_length and temperature are used")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.params.dtype=bfloat16")
    p.add_argument("--rollouts", required=True, help="local .jsonl/.json/.parquet/.csv file or dataset directory "
                                                     "with `prompt` and `completion` columns")
    p.add_argument("--out", required=True, help="cache directory; running again finishes an interrupted cache")
    p.add_argument("--top-k", type=int, default=64, help="teacher top-k log-probs stored per token (default 64)")
    p.add_argument("--shard-size", type=int, default=256, help="rollouts per shard file (default 256)")
    p.add_argument("--topk-dtype", choices=TOPK_DTYPES, default="float16",
                   help="dtype of the stored top-k log-probs (default float16; sampled-token log-probs are float32)")
    p.add_argument("--sft-teacher", help="the model whose outputs the student was fine-tuned on (recorded in the "
                                         "manifest; offline_cache then requires it to be the OPD teacher)")
    p.add_argument("--sft-data", help="the SFT data set the student was fine-tuned on (recorded as given)")
    p.add_argument("--rollouts-from", help="the policy that produced --rollouts (recorded as given)")


def run(args: argparse.Namespace) -> int:
    """``opd-plugins precompute-teacher``: validate the recipe, precompute, print how to train on the cache."""
    import sys

    from opd_plugins.recipe import load_recipe

    recipe, pm = load_recipe(args.recipe, list(args.overrides))
    out = args.out
    manifest = precompute_teacher(recipe, pm, rollouts=args.rollouts, out_dir=out, shard_size=args.shard_size,
                                  top_k=args.top_k, topk_dtype=args.topk_dtype, progress=sys.stderr.isatty(),
                                  provenance={"sft_teacher": args.sft_teacher, "sft_data": args.sft_data,
                                              "rollouts_from": args.rollouts_from})
    d = manifest["data"]
    print(f"{out}: teacher cache of {d['num_rows']} rollouts ({d['num_completion_tokens']} completion tokens, "
          f"top-{manifest['top_k']}) by {manifest['teacher']['id']!r}. Train with "
          f"teacher: {{name: offline_cache, params: {{path: {out}, teacher: {manifest['teacher']['id']}}}}} "
          f"and rollout: {{name: replay, params: {{path: {out}}}}}")
    return 0

def _teacher_params(recipe: Any, pm: Any) -> Any:
    from opd_plugins.teachers.hf_model import HFModelTeacher

    spec = recipe.teacher
    if spec is None:
        raise OPDError(f"{recipe.source}: precompute-teacher needs a teacher; add teacher: {{name: hf_model, "
                       "params: {model: ...}}} to the recipe")
    if spec.name == "hf_model":
        return pm.registry.get("teacher", "hf_model").Params(**spec.params)
    if spec.name == "offline_cache":
        return HFModelTeacher.Params(model=spec.params["teacher"])
    raise OPDError(f"{recipe.source}: teacher.name: precompute-teacher scores with a local model, so the recipe's "
                   f"teacher must be hf_model (or offline_cache, whose `teacher` is then loaded), not {spec.name!r}")

def _config_vocab_size(path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config().vocab_size


__all__ = ["add_arguments", "precompute_teacher", "run"]
