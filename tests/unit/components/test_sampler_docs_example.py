"""The sampler in docs/samplers.md runs as written and passes the sampler contract's checks."""

import re
from pathlib import Path

import torch

from opd_plugins.samplers.base import SamplerFeedback
from opd_plugins.trainers.guided import plan

DOC = Path(__file__).resolve().parents[3] / "docs" / "samplers.md"


def test_the_documented_sampler_works(opd_tokenizer):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the project's own documentation
    sampler = namespace["AnswerHint"]()
    prompts = [[{"role": "user", "content": "a hard one: 2 + 2?"}]] * 2 + [[{"role": "user", "content": "1 + 1?"}]] * 2
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, ["4", "4", "2", "2"])]
    out = sampler.prepare(prompts, rows, step=0)
    assert [g.role for g in out.guidance] == ["context", "context", "none", "none"]
    assert out.guidance[0].prompt[-1]["content"].endswith("The answer is 4.")
    guided = plan(sampler, out, prompts, opd_tokenizer, max_completion_length=16)  # what the trainer checks
    assert guided.rows_with("context") == [0, 1] and guided.originals == prompts
    sampler.observe(SamplerFeedback(rows=rows, rewards=torch.tensor([0.0, 1.0, 1.0, 1.0]), guidance=out.guidance,
                                    completions=["4"] * 4, num_generations=2, step=0))
    assert namespace["opd_register_components"]() == [namespace["AnswerHint"]]
