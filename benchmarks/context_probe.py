"""How good is a self-distillation teacher? Greedy held-out accuracy of a model without and with a privileged context.

On-policy self-distillation can only teach what the model answers correctly when it sees the privileged context,
so measure that first: the model's accuracy on the task's eval split as is, then with each teacher template
(the same ``{prompt}`` / ``{hint}`` / ``{answer}`` fields as ``self_context``'s ``template``).

    OMP_NUM_THREADS=2 python benchmarks/context_probe.py --op max \\
        --template '{prompt}\\n\\n{hint}' --template '{prompt} (The larger number is {answer}.)'
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--op", default="max", choices=["add", "sub", "mul", "max"])
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--n", type=int, default=100, help="held-out problems")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--template", action="append", default=[],
                    help="teacher context, e.g. '{prompt}\\n\\n{hint}' (repeatable; \\n is a newline)")
    args = ap.parse_args()

    from opd_plugins.data.tasks import get_task
    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype="float32", tokenizer=tok)
    task = get_task("arithmetic", {"op": args.op, "digits": args.digits, "answer_format": "number_only"})
    ds = task.build("eval", args.n, 0)
    results = []
    for template in [None, *args.template]:
        shown = ds
        if template is not None:
            template = template.replace("\\n", "\n")
            shown = ds.map(lambda r, t=template: {"prompt": [{"role": "user", "content": t.format(
                prompt=r["prompt"][0]["content"], hint=r["hint"], answer=r["answer"])}]})
        res = evaluate_accuracy(model, tok, shown, task, num_prompts=args.n, max_new_tokens=args.max_new_tokens,
                                temperature=0.0, batch_size=50, seed=0, desc=template or "no context")
        results.append({"template": template, "accuracy": res["accuracy"], "n": res["n"],
                        "first_completions": [e["completion"] for e in res["examples"][:3]]})
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
