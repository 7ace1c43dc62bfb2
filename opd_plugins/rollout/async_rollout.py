"""``async``: rollouts generated ahead, in a background thread, by a private copy of the policy, with bounded
staleness."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams, ComponentSpec
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError
from opd_plugins.rollout.base import RolloutBackend


def fingerprint(prompt_ids: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """The key of one generation batch: its prompts' token ids, in order."""
    return tuple(tuple(int(t) for t in p) for p in prompt_ids)


class AsyncRollout(RolloutBackend):
    """Generates the next ``ahead`` generation batches in a background thread while the trainer trains on the
    current one, with a private copy of the policy that lags by at most ``max_staleness`` optimizer steps.

    Asynchronous RL (one-step off-policy training in verl, PipelineRL, AReaL; paper catalog §7.1): generation of
    batch t+1 overlaps training on batch t. The sampling is done by the nested ``backend``, which must sample from
    its own copy of the policy (``perturbed_hf`` with no noise, the default: an exact copy; or ``fp8`` with
    ``flow: rollout_only``); it runs in one producer thread. The trainer tells the backend which prompts come next
    (:meth:`prefetch`, from a look-ahead over the same data order) and asks for the current ones (:meth:`generate`):
    a batch generated ahead is returned, else (a miss: the first batch, a changed order, a dropped batch) it is
    generated now. Every completion carries the policy version (optimizer step) of the weights that sampled it and
    its behaviour log-probs, so the shared correction (``correction:``) weights stale tokens; a batch staler than
    ``max_staleness`` steps when it is used is dropped and generated again (counted). ``sync_weights`` (after each
    optimizer step) waits for the batch being generated, copies the new weights, and lets the producer go on, so no
    completion is sampled by half-updated weights. ``max_staleness: 0`` is synchronous generation with a private
    copy.

    Checkpoints hold the counters; the batches in flight are not saved: after a resume they are generated again
    from the restored policy (the data order is the same, so no prompt is lost or used twice; the regenerated count
    is logged). Logged: ``rollout/async/hits``, ``misses``, ``dropped``, ``wait_s`` (time the trainer waited for a
    batch), ``staleness_max``. One process per rank, each with its own producer; no DeepSpeed ZeRO-3 / FSDP (the
    copy needs whole weights), no hint/prefix sampler (the producer generates before the sampler guides).
    """

    name: ClassVar[str] = "async"
    reports_behaviour_logps: ClassVar[bool] = True
    generates_ahead: ClassVar[bool] = True
    nested_slots: ClassVar[dict[str, str]] = {"backend": "rollout"}

    class Params(ComponentParams):
        backend: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="perturbed_hf"),
                                       description="The backend that samples (from its own copy of the policy).")
        max_staleness: int = Field(1, ge=0, description="K: the most optimizer steps a used rollout may lag.")
        ahead: int = Field(1, ge=0, description="Generation batches generated ahead of the one being trained.")

        @model_validator(mode="after")
        def _check(self) -> "AsyncRollout.Params":
            if self.ahead > self.max_staleness:
                raise ValueError(f"ahead ({self.ahead}) is above max_staleness ({self.max_staleness}): batches "
                                 "generated that far ahead would be staler than allowed when used")
            return self

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.inner: RolloutBackend = self.nested["backend"]
        self.precision = f"async({self.inner.precision})"  # type: ignore[misc]
        self._ctx: SetupContext | None = None
        self._lock = threading.Lock()  # held while the copy generates or is synced
        self._pool: ThreadPoolExecutor | None = None
        self._pending: OrderedDict[tuple, Future] = OrderedDict()
        self.counts = {"hits": 0, "misses": 0, "dropped": 0, "regenerated_after_resume": 0}
        self.staleness: list[int] = []
        self._resumed = False

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(max_staleness=1, ahead=1)

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        if sharding in ("fsdp", "deepspeed_zero3"):
            return [("", f"rollout 'async' samples from a whole copy of the policy, so it does not support "
                         f"{sharding}; use one process or DDP (recipes/accelerate/ddp.yaml)")]
        return []

    # ------------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        for _, message in self.engine_problems(ctx.sharding, lora=False):
            raise OPDError(message)
        self.inner.setup(ctx)
        if getattr(self.inner, "behaviour_model", None) is None:
            raise OPDError(f"rollout 'async' generates in a background thread, so its backend must sample from its "
                           f"own copy of the policy; {self.inner.name!r} samples the live training model (use "
                           "perturbed_hf, or fp8 with flow: rollout_only)")
        self._ctx = ctx

    @property
    def version(self) -> int:
        return int(getattr(self.inner, "version", 0) or 0)

    def sync_weights(self, model: Any, version: int) -> None:
        """Wait for the batch being generated, copy the new weights into the backend's copy, go on."""
        with self._lock:
            self.inner.sync_weights(model, version)

    def _produce(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        with self._lock:  # the copy is not synced while it generates
            at = Sampling(num_generations=sampling.num_generations, step=self.version)  # never re-sync in here
            return self.inner.generate(prompt_ids, at)

    def prefetch(self, batches: list[tuple[list[list[int]], Sampling]]) -> None:
        """The next generation batches (prompt ids and sampling), in order: start generating up to ``ahead`` of them."""
        if self.params.ahead == 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-async-rollout")
        for prompt_ids, sampling in batches[: self.params.ahead]:
            key = fingerprint(prompt_ids)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._produce, prompt_ids, sampling)
        while len(self._pending) > self.params.ahead + 1:  # forget the oldest that was never asked for
            _, stale = self._pending.popitem(last=False)
            stale.cancel()

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        if self._ctx is None:
            raise RuntimeError("async rollout used before setup()")
        future = self._pending.pop(fingerprint(prompt_ids), None)
        out = None
        if future is not None:
            start = time.perf_counter()
            out = future.result()
            self._ctx.log("rollout/async/wait_s", time.perf_counter() - start)
            staleness = int(sampling.step) - min(out.versions())
            if staleness > self.params.max_staleness:
                self.counts["dropped"] += 1
                out = None
            else:
                self.counts["hits"] += 1
                self.staleness.append(staleness)
        if out is None:
            if future is None:
                self.counts["misses"] += 1
                if self._resumed:
                    self.counts["regenerated_after_resume"] += 1
                    self._resumed = False
            out = self._produce(prompt_ids, sampling)
            self.staleness.append(int(sampling.step) - min(out.versions()))
        for key, value in self.counts.items():
            self._ctx.log(f"rollout/async/{key}", float(value))
        self._ctx.log("rollout/async/staleness_max", float(max(self.staleness[-1:] or [0])))
        return out

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "staleness_histogram": self.histogram(), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.counts.update({k: int(v) for k, v in state.pop("counts", {}).items()})
        hist = state.pop("staleness_histogram", {})
        self.staleness = [int(k) for k, n in hist.items() for _ in range(int(n))]
        self._resumed = True  # what was in flight at the checkpoint is generated again, and counted
        super().load_state_dict(state)

    def histogram(self) -> dict[str, int]:
        """How many used batches had each staleness (optimizer steps between sampling and use)."""
        out: dict[str, int] = {}
        for s in self.staleness:
            out[str(s)] = out.get(str(s), 0) + 1
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        super().close()


__all__ = ["AsyncRollout", "fingerprint"]
