"""The async backend on a crafted schedule: hits, misses, staleness bounded by K exactly, drops, resume accounting."""

import threading

import pytest

from opd_plugins.context import Rollouts, Sampling
from opd_plugins.rollout.async_rollout import AsyncRollout
from opd_plugins.rollout.base import RolloutBackend
from opd_plugins.testing import fake_context


class FakeCopy(RolloutBackend):
    """Samples 'from a private copy' at a version; records which thread generated and when."""

    name = "fake_copy"

    def __init__(self, params=None):
        super().__init__(params)
        self.behaviour_model, self.version, self.calls = object(), 0, []
        self.gate = threading.Event()
        self.gate.set()

    def setup(self, ctx):
        self.version = ctx.step

    def sync_weights(self, model, version):
        self.version = version

    def generate(self, prompt_ids, sampling):
        self.gate.wait(5)
        self.calls.append((tuple(map(tuple, prompt_ids)), self.version, threading.current_thread().name))
        return Rollouts([[p[0] + 100] for p in prompt_ids], [[-0.5] for _ in prompt_ids], self.version)


def _backend(opd_tokenizer, K=1, ahead=1):
    from opd_plugins.testing import build_tiny_model

    inner = FakeCopy()
    ctx = fake_context(build_tiny_model(opd_tokenizer), opd_tokenizer)
    logged = []
    ctx.log = lambda name, value: logged.append((name, value))
    backend = AsyncRollout(AsyncRollout.Params(max_staleness=K, ahead=ahead), nested={"backend": inner})
    backend.setup(ctx)
    return backend, inner, logged


def batch(i):
    return [[i, 1], [i, 2]]


def test_generated_ahead_in_the_background_and_used_within_k(opd_tokenizer):
    backend, inner, _ = _backend(opd_tokenizer, K=1)
    s = lambda step: Sampling(num_generations=2, step=step)  # noqa: E731
    first = backend.generate(batch(0), s(0))  # nothing prefetched: generated now, in this thread
    assert first.completion_ids == [[100], [100]] and backend.counts["misses"] == 1
    backend.prefetch([(batch(1), s(0))])
    backend.sync_weights(None, 1)  # the optimizer step: waits for the producer, then copies
    out = backend.generate(batch(1), s(1))
    assert out.completion_ids == [[101], [101]] and backend.counts["hits"] == 1
    assert out.versions() == [0, 0] or out.versions() == [1, 1]  # sampled before or after the sync, never torn
    assert any(name.startswith("opd-async-rollout") for *_, name in inner.calls)
    assert max(backend.staleness) <= 1
    backend.close()


def test_a_batch_staler_than_k_is_dropped_and_generated_again(opd_tokenizer):
    backend, inner, logged = _backend(opd_tokenizer, K=1)
    s = lambda step: Sampling(num_generations=2, step=step)  # noqa: E731
    backend.prefetch([(batch(5), s(0))])
    backend._pending[next(iter(backend._pending))].result()  # generated at version 0
    backend.sync_weights(None, 1)
    backend.sync_weights(None, 2)  # two optimizer steps before it is used: staleness 2 > K = 1
    out = backend.generate(batch(5), s(2))
    assert backend.counts["dropped"] == 1 and out.versions() == [2, 2]  # regenerated with the current copy
    assert backend.histogram() == {"0": 1}
    assert ("rollout/async/dropped", 1.0) in logged
    backend.close()


@pytest.mark.parametrize("K", [0, 2])
def test_staleness_never_exceeds_k_on_a_schedule(opd_tokenizer, K):
    backend, inner, _ = _backend(opd_tokenizer, K=K, ahead=K)
    for step in range(8):
        backend.generate(batch(step), Sampling(num_generations=2, step=step))
        backend.prefetch([(batch(step + j), Sampling(num_generations=2, step=step)) for j in range(1, K + 1)])
        backend.sync_weights(None, step + 1)
    assert all(0 <= s <= K for s in backend.staleness) and len(backend.staleness) == 8
    assert sum(backend.counts[k] for k in ("hits", "misses")) == 8
    if K == 0:
        assert backend.counts["hits"] == 0 and all(v == step for step, (_, v, _) in enumerate(inner.calls))
    backend.close()


def test_resume_keeps_the_accounting_and_counts_the_regenerated_batch(opd_tokenizer):
    backend, _, _ = _backend(opd_tokenizer, K=1)
    backend.generate(batch(0), Sampling(num_generations=2, step=0))
    backend.prefetch([(batch(1), Sampling(num_generations=2, step=0))])
    state = backend.state_dict()
    backend.close()
    resumed, _, _ = _backend(opd_tokenizer, K=1)
    resumed.load_state_dict(state)
    assert resumed.counts == {**state["counts"]} and resumed.histogram() == state["staleness_histogram"]
    resumed.generate(batch(1), Sampling(num_generations=2, step=1))  # in flight at the checkpoint: generated again
    assert resumed.counts["regenerated_after_resume"] == 1 and resumed.counts["misses"] == 2
    resumed.close()


def test_ahead_above_k_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ahead \\(2\\) is above max_staleness \\(1\\)"):
        AsyncRollout.Params(max_staleness=1, ahead=2)
    with pytest.raises(ValidationError):
        AsyncRollout.Params(max_staleness=-1)
