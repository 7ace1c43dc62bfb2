"""A probe for multi-process runs: records, on every rank, the prompt chunks the recipe's ``prompt_selection`` drew,
the rewards it observed and its state at the end of training (``OPD_TEST_SELECTION_PROBE.<rank>``, JSON)."""

import json
import os

import torch

from opd_plugins import hookimpl

_RECORDS: dict[int, dict] = {}


@hookimpl
def opd_trainer_init(trainer):
    selection = trainer.components.prompt_selection
    record = _RECORDS[id(trainer)] = {"rank": trainer.accelerator.process_index,
                                      "world": trainer.accelerator.num_processes, "drawn": [], "observed": []}
    select, observe = selection.select, selection.observe

    def spy_select(k, n_prompts, step):
        chunk = select(k, n_prompts, step)
        record["drawn"].append([int(i) for i in chunk])
        return chunk

    def spy_observe(indices, rewards, step):
        record["observed"].append({"indices": [int(i) for i in indices], "rewards": rewards.tolist(), "step": step})
        return observe(indices, rewards, step)

    selection.select, selection.observe = spy_select, spy_observe


@hookimpl
def opd_train_end(trainer):
    path = os.environ.get("OPD_TEST_SELECTION_PROBE")
    record = _RECORDS.pop(id(trainer), None)
    if not path or record is None:
        return
    state = trainer.components.prompt_selection.state_dict()
    record["state"] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    with open(f"{path}.{record['rank']}", "w") as f:
        json.dump(record, f, default=str)
