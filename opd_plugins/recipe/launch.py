"""The distributed launch a recipe will run under (``accelerate launch``'s engine and world size), read from the
environment accelerate sets for each process or from an accelerate config file, and the recipe settings that
contradict it. ``train`` checks them before any model loads; ``validate --accelerate-config FILE`` checks a recipe
against a config before it is launched on many GPUs.

Scaling rides accelerate: the engine comes from the accelerate config, never from the recipe. ``trainer.args``
may repeat FSDP/DeepSpeed settings only where they agree with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd_plugins.errors import OPDError, Problem

ENGINES = ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")

# trainer.args keys through which transformers' Trainer would configure an engine itself
ENGINE_ARGS = ("fsdp", "fsdp_config", "deepspeed")


@dataclass(frozen=True)
class Launch:
    """``engine``: ``none`` (one process), ``ddp``, ``fsdp``, ``deepspeed_zero2`` (ZeRO-1/2) or ``deepspeed_zero3``;
    ``world_size``: processes over all nodes; ``fsdp_version`` / ``zero_stage`` where they apply; ``source``: where
    this was read (for messages)."""

    engine: str = "none"
    world_size: int = 1
    fsdp_version: int | None = None
    zero_stage: int | None = None
    source: str = "this process (no distributed launch)"

    @property
    def sharding(self) -> str:
        """The student's parameter layout in :class:`~opd_plugins.context.SetupContext` terms."""
        if self.engine == "fsdp":
            return "fsdp"
        if self.engine == "deepspeed_zero3":
            return "deepspeed_zero3"
        return "ddp" if self.world_size > 1 else "none"


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """The launch of this process, from what ``accelerate launch`` (or ``torchrun``) put in the environment."""
    env = os.environ if env is None else env
    world = _int(env.get("WORLD_SIZE"), 1)
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true"):
        return Launch("fsdp", world, fsdp_version=_int(env.get("FSDP_VERSION"), 1), source="the accelerate launch (FSDP)")
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() in ("1", "true"):
        stage = _int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), 2)
        return Launch("deepspeed_zero3" if stage == 3 else "deepspeed_zero2", world, zero_stage=stage,
                      source=f"the accelerate launch (DeepSpeed ZeRO-{stage})")
    if world > 1:
        return Launch("ddp", world, source=f"the launch ({world} processes)")
    return Launch()


def launch_from_accelerate_config(path: str | os.PathLike) -> Launch:
    """The launch an accelerate config file describes (``distributed_type``, ``num_processes`` over all machines,
    ``fsdp_config.fsdp_version``, ``deepspeed_config.zero_stage``)."""
    import yaml

    p = Path(path)
    try:
        config = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise OPDError(f"accelerate config {str(p)!r} cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise OPDError(f"accelerate config {str(p)!r} is not a mapping")
    kind = str(config.get("distributed_type", "NO")).upper()
    world = _int(config.get("num_processes"), 1)
    source = f"accelerate config {str(p)!r}"
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        return Launch("fsdp", world, fsdp_version=_int(fsdp.get("fsdp_version"), 1), source=source)
    if kind == "DEEPSPEED":
        stage = _int((config.get("deepspeed_config") or {}).get("zero_stage"), 2)
        return Launch("deepspeed_zero3" if stage == 3 else "deepspeed_zero2", world, zero_stage=stage, source=source)
    if kind in ("MULTI_GPU", "MULTI_CPU") or world > 1:
        return Launch("ddp", world, source=source)
    return Launch("none", 1, source=source)


def _deepspeed_stage(value: Any) -> int | None:
    """The ZeRO stage of a ``trainer.args.deepspeed`` value (a dict or a JSON file path), None if unknown."""
    import json

    if isinstance(value, (str, os.PathLike)):
        try:
            value = json.loads(Path(value).read_text())
        except (OSError, ValueError):
            return None
    if isinstance(value, dict):
        stage = (value.get("zero_optimization") or {}).get("stage")
        return stage if isinstance(stage, int) else None
    return None


def engine_arg_problems(args: Mapping[str, Any], launch: Launch) -> list[Problem]:
    """``trainer.args`` FSDP/DeepSpeed settings that contradict ``launch``."""
    problems: list[Problem] = []
    where = launch.source
    fsdp = args.get("fsdp")
    if fsdp and launch.engine != "fsdp":
        problems.append(Problem("trainer.args.fsdp", (
            f"fsdp: {fsdp!r} asks transformers to shard with FSDP, but {where} runs "
            f"{'no FSDP' if launch.engine == 'none' else launch.engine}; choose the engine in the accelerate config "
            "(recipes/accelerate/fsdp2.yaml) and remove fsdp from trainer.args")))
    fsdp_config = args.get("fsdp_config")
    version = fsdp_config.get("fsdp_version", fsdp_config.get("version")) if isinstance(fsdp_config, dict) else None
    if fsdp_config and launch.engine != "fsdp":
        problems.append(Problem("trainer.args.fsdp_config", (
            f"fsdp_config is set, but {where} does not run FSDP; put FSDP settings in the accelerate config "
            "(recipes/accelerate/fsdp2.yaml) and remove fsdp_config from trainer.args")))
    elif version is not None and launch.fsdp_version is not None and _int(version, 0) != launch.fsdp_version:
        problems.append(Problem("trainer.args.fsdp_config", (
            f"fsdp_version {version} contradicts {where}, which runs FSDP{launch.fsdp_version}; remove it from "
            "trainer.args (the accelerate config decides)")))
    ds = args.get("deepspeed")
    if ds:
        if not launch.engine.startswith("deepspeed"):
            problems.append(Problem("trainer.args.deepspeed", (
                f"deepspeed is set, but {where} runs {launch.engine}; choose DeepSpeed in the accelerate config "
                "(recipes/accelerate/zero2.yaml or zero3.yaml) and remove deepspeed from trainer.args")))
        else:
            stage = _deepspeed_stage(ds)
            if stage is not None and launch.zero_stage is not None and stage != launch.zero_stage:
                problems.append(Problem("trainer.args.deepspeed", (
                    f"the DeepSpeed config in trainer.args uses ZeRO stage {stage}, but {where} runs ZeRO-"
                    f"{launch.zero_stage}; keep one: remove deepspeed from trainer.args")))
    return problems


def engine_component_problems(built: Mapping[str, Any], launch: Launch, *, lora: bool) -> list[Problem]:
    """Each built component's :meth:`~opd_plugins.components.Component.engine_problems` under ``launch``."""
    problems = []
    for slot, component in built.items():
        for i, sub in enumerate(component if isinstance(component, list) else [component]):
            where = f"{slot}[{i}]" if isinstance(component, list) else slot
            for path, msg in sub.engine_problems(launch.sharding, lora=lora):
                problems.append(Problem(f"{where}.params.{path}" if path else where,
                                        f"{msg} (launched with {launch.source})"))
    return problems


__all__ = ["ENGINES", "ENGINE_ARGS", "Launch", "engine_arg_problems", "engine_component_problems",
           "launch_from_accelerate_config", "launch_from_env"]
