"""``vllm``: rollouts from vLLM through TRL's own vLLM paths (colocated engine or ``trl vllm-serve`` server)."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from typing import Any, ClassVar, Literal

from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError
from opd_plugins.rollout.base import RolloutBackend

Quantization = Literal["fp8", "fp8_per_tensor", "fp8_per_block", "mxfp8"]
"""vLLM's online quantization schemes (a BF16/FP16 checkpoint quantized at load time; ``mxfp8`` needs SM100+)."""

_INSTALL = "install it with `pip install 'trl[vllm]'` (TRL 1.16 supports vLLM 0.22-0.31)"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMRollout(RolloutBackend):
    """Rollouts from vLLM, through TRL 1.16's own vLLM generation (``use_vllm``), with vLLM's log-probs of the sampled
    tokens (``processed_logprobs``: after temperature and top-k/top-p) as behaviour log-probs, so the shared
    correction (``correction:``) and the ``correction/*`` metrics see the engine's mismatch.

    The backend sets the TRL arguments itself (:meth:`trainer_args`): ``use_vllm``, ``vllm_mode`` and the mode's own
    settings, and ``vllm_importance_sampling_correction: false`` — TRL's built-in importance sampling is always off,
    so nothing is weighted twice; the recipe's ``correction:`` is the only correction (``none`` by default: metrics
    only; TRL's own default corresponds to ``{mode: sequence_mis, clip_max: 3.0}``).

    ``mode: colocate`` runs the engine inside the training processes (``gpu_memory_utilization``,
    ``tensor_parallel_size``). TRL 1.16 builds that engine with ``quantization=None`` (only bitsandbytes 4-bit models
    get one), so ``quantization`` is refused there. ``mode: server`` talks to ``trl vllm-serve`` / ``vllm serve`` at
    ``server_host:server_port``; the server's own flags decide its memory, parallelism and quantization (``trl
    vllm-serve --model M -- --quantization fp8_per_block``), and ``quantization`` records what it was started with:
    at setup the server is asked (``/server_info``) and a different setting is an error. Weights are pushed to the
    engine by TRL at every step change; vLLM re-quantizes online-quantized weights as they load. Needs a CUDA GPU and
    vllm, which validation checks before any model loads.
    """

    name: ClassVar[str] = "vllm"
    reports_behaviour_logps: ClassVar[bool] = True
    precision: ClassVar[str] = "vllm"

    class Params(ComponentParams):
        mode: Literal["colocate", "server"] = Field("colocate", description="colocate: engine in the training "
                                                    "processes; server: a running `trl vllm-serve`.")
        gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate: GPU memory fraction for vLLM.")
        tensor_parallel_size: int = Field(1, ge=1, description="colocate: tensor-parallel size of the engine.")
        server_host: str = Field("0.0.0.0", min_length=1, description="server: host of the vLLM server.")
        server_port: int = Field(8000, ge=1, le=65535, description="server: port of the vLLM server.")
        quantization: Quantization | None = Field(
            None, description="server: the online quantization the server was started with (checked at setup).")
        check_server: bool = Field(True, description="server: compare quantization with the server's at setup.")

    _COLOCATE_ONLY: ClassVar[tuple[str, ...]] = ("gpu_memory_utilization", "tensor_parallel_size")
    _SERVER_ONLY: ClassVar[tuple[str, ...]] = ("server_host", "server_port", "check_server")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        q = self.params.quantization
        self.precision = f"vllm_{q}" if q else "vllm"  # type: ignore[misc]  # this instance's engine precision
        self._generate: Any = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params()

    # ------------------------------------------------------------------------------------------------------
    def trainer_args(self) -> dict[str, Any]:
        """TRL's vLLM arguments for this mode (merged into the trainer config; a contradicting ``trainer.args`` is
        refused)."""
        p = self.params
        args: dict[str, Any] = {"use_vllm": True, "vllm_mode": p.mode, "vllm_importance_sampling_correction": False}
        if p.mode == "colocate":
            args.update(vllm_gpu_memory_utilization=p.gpu_memory_utilization,
                        vllm_tensor_parallel_size=p.tensor_parallel_size)
        else:
            args.update(vllm_server_host=p.server_host, vllm_server_port=p.server_port)
        return args

    def problems(self) -> list[tuple[str, str]]:
        p, out = self.params, []
        fields = type(p).model_fields
        changed = {k for k in fields if getattr(p, k) != fields[k].default}  # a full dump round-trips
        if p.mode == "colocate" and p.quantization is not None:
            out.append(("quantization", (
                f"mode: colocate does not support quantization: {p.quantization}, because TRL 1.16 builds its "
                "colocated vLLM engine with quantization=None (only bitsandbytes 4-bit models get one), so it would "
                "be silently ignored. Use mode: server and start the server with it (`trl vllm-serve --model M -- "
                f"--quantization {p.quantization}`), or the fp8 rollout backend (rollout.name: fp8)")))
        wrong = self._SERVER_ONLY if p.mode == "colocate" else self._COLOCATE_ONLY
        for key in sorted(changed & set(wrong)):
            where = ("the server's own flags decide it: pass --" + key.replace("_", "-") + " to `trl vllm-serve`"
                     if p.mode == "server" else "it applies to mode: server")
            out.append((key, f"{key} is not used in mode: {p.mode} ({where}); remove it"))
        if _cuda_available() and not vllm_installed():  # without a GPU, gpu_problems says it
            out.append(("mode", f"rollout 'vllm' needs the vllm package, which is not installed; {_INSTALL}"))
        return out

    def gpu_problems(self) -> list[tuple[str, str]]:
        out = [("mode", "vLLM needs a CUDA GPU and none is available here; on CPU use rollout hf_generate, or fp8 "
                        "for FP8 rollouts")]
        if not vllm_installed():
            out.append(("mode", f"vllm is not installed; {_INSTALL}"))
        return out

    # ------------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        if ctx.trl_generate is None:
            raise OPDError("rollout 'vllm' runs TRL's vLLM generation, which this context does not provide (it is "
                           "set by OPDTrainer)")
        problems = [f"params.{k}: {m}" for k, m in self.problems()]
        if problems:
            raise OPDError("rollout 'vllm': " + "; ".join(problems))
        p = self.params
        if p.mode == "server" and p.check_server and ctx.process_index == 0:
            running = server_quantization(p.server_host, p.server_port)
            if running != p.quantization:
                raise OPDError(
                    f"rollout 'vllm': the vLLM server at {p.server_host}:{p.server_port} runs quantization: "
                    f"{running}, but params.quantization is {p.quantization}; set params.quantization to {running!r} "
                    "(or restart the server with `-- --quantization <scheme>`)")
        self._generate = ctx.trl_generate

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        if self._generate is None:
            raise RuntimeError("vllm rollout used before setup()")
        completion_ids, logprobs = self._generate(prompt_ids, sampling.images, sampling.multimodal_fields,
                                                  sampling.num_generations, sampling.has_tool_images)
        if logprobs is None:
            raise OPDError("rollout 'vllm' got no vLLM log-probs back: the trainer is not generating with vLLM "
                           "(use_vllm is off). Build the trainer config with the backend's trainer_args() "
                           "(opd_plugins.runs.opd.build_config does) instead of setting trainer args by hand")
        return Rollouts(completion_ids, logprobs, sampling.step)


def server_quantization(host: str, port: int, timeout: float = 10.0) -> str | None:
    """The quantization a running vLLM server reports in ``/server_info`` (TRL's ``VLLMClient.get_server_info``)."""
    url = f"http://{host}:{port}/server_info?config_format=json"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's own server
            info = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise OPDError(f"rollout 'vllm': could not read {url} ({exc}); is `trl vllm-serve` running there (with "
                       "VLLM_SERVER_DEV_MODE=1)? Set params.check_server: false to skip this check") from None
    config = info.get("vllm_config", info)
    model_config = config.get("model_config", {}) if isinstance(config, dict) else {}
    return model_config.get("quantization")


__all__ = ["Quantization", "VLLMRollout", "server_quantization", "vllm_installed"]
