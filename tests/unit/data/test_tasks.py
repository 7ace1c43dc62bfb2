"""Built-in verifiable tasks: splits, determinism, scoring, validation and the TRL reward function."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from opd_plugins.data.tasks import (
    EVAL_SEED_OFFSET,
    decode_metadata,
    encode_metadata,
    TASKS,
    ArithmeticTask,
    ReasoningGymTask,
    completion_text,
    extract_last_number,
    get_task,
    make_reward_function,
    validate_task_params,
)
from opd_plugins.errors import DataError, OPDError

STANDARD_COLUMNS = ["prompt", "answer", "hint", "task", "metadata", "solution"]


def questions(ds) -> list[str]:
    return [p[-1]["content"] for p in ds["prompt"]]


# --------------------------------------------------------------------------------------------------------------------
# arithmetic: building
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["add", "sub", "mul", "max"])
def test_arithmetic_rows_have_the_standard_columns_and_correct_answers(op):
    ds = get_task("arithmetic", {"op": op, "digits": 2}).build("train", 30, seed=0)
    assert ds.column_names == STANDARD_COLUMNS
    assert len(ds) == 30
    for row in ds:
        a, b = json.loads(row["metadata"])["operands"]
        expected = {"add": a + b, "sub": a - b, "mul": a * b, "max": max(a, b)}[op]
        assert row["answer"] == str(expected)
        assert row["hint"] == f"(Hint: the correct answer is {expected}.)"
        assert row["task"] == "arithmetic"
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert 10 <= a <= 99 and 10 <= b <= 99


def test_arithmetic_question_wording():
    add = get_task("arithmetic", {"op": "add", "digits": 2}).build("train", 1, 0)[0]
    mul = get_task("arithmetic", {"op": "mul", "digits": 1}).build("train", 1, 0)[0]
    big = get_task("arithmetic", {"op": "max", "digits": 2}).build("train", 1, 0)[0]
    a, b = json.loads(add["metadata"])["operands"]
    assert add["prompt"][0]["content"] == f"What is {a} + {b}?"
    a, b = json.loads(mul["metadata"])["operands"]
    assert mul["prompt"][0]["content"] == f"What is {a} times {b}?"
    assert 2 <= a <= 9 and 2 <= b <= 9
    a, b = json.loads(big["metadata"])["operands"]
    assert big["prompt"][0]["content"] == f"Which number is larger: {a} or {b}?"
    assert a != b


def test_arithmetic_number_only_and_template_and_operands():
    row = get_task("arithmetic", {"answer_format": "number_only"}).build("train", 1, 0)[0]
    assert row["prompt"][0]["content"].endswith("? Reply with just the number.")
    row = get_task("arithmetic", {"question_template": "Compute {a} plus {b} ({expression})."}).build("eval", 1, 0)[0]
    a, b = json.loads(row["metadata"])["operands"]
    assert row["prompt"][0]["content"] == f"Compute {a} plus {b} ({a} + {b})."
    row = get_task("arithmetic", {"op": "mul", "digits": 1, "operands": 3}).build("train", 1, 5)[0]
    a, b, c = json.loads(row["metadata"])["operands"]
    assert row["prompt"][0]["content"] == f"What is {a} times {b} times {c}?"
    assert row["answer"] == str(a * b * c)


def test_arithmetic_is_deterministic_and_seed_dependent():
    task = get_task("arithmetic", {"op": "add", "digits": 2})
    assert task.build("train", 50, seed=3).to_list() == task.build("train", 50, seed=3).to_list()
    assert questions(task.build("train", 50, seed=3)) != questions(task.build("train", 50, seed=4))
    # a larger size extends a smaller one
    assert questions(task.build("train", 80, seed=3))[:50] == questions(task.build("train", 50, seed=3))


@pytest.mark.parametrize(
    "params",
    [
        {"op": "add", "digits": 2},  # enumerated problem space
        {"op": "mul", "digits": 1},  # tiny space: 64 ordered pairs
        {"op": "max", "digits": 2},
        {"op": "add", "digits": 3, "operands": 3},  # sampled problem space
    ],
)
def test_arithmetic_train_and_eval_are_disjoint_for_every_seed(params):
    task = get_task("arithmetic", params)
    size = 10 if params.get("digits") == 1 else 150
    train = set()
    for seed in range(4):
        train |= set(questions(task.build("train", size, seed)))
    evals = set()
    for seed in range(4):
        evals |= set(questions(task.build("eval", size, seed)))
    assert train and evals
    assert not train & evals


def test_arithmetic_commutative_problems_stay_in_one_split():
    task = get_task("arithmetic", {"op": "mul", "digits": 1})
    train = {tuple(sorted(json.loads(m)["operands"])) for m in task.build("train", 48, 0)["metadata"]}
    evals = {tuple(sorted(json.loads(m)["operands"])) for m in task.build("eval", 16, 0)["metadata"]}
    assert not train & evals  # "7 times 8" in train never has "8 times 7" in eval


def test_arithmetic_has_no_duplicates_and_uses_the_whole_small_space():
    task = get_task("arithmetic", {"op": "mul", "digits": 1})
    train, evals = task.build("train", 48, 0), task.build("eval", 16, 0)
    assert len(set(questions(train))) == 48 and len(set(questions(evals))) == 16
    assert len(set(questions(train)) | set(questions(evals))) == task.space_size() == 64


def test_arithmetic_too_large_size_says_how_many_problems_exist():
    task = get_task("arithmetic", {"op": "mul", "digits": 1})
    with pytest.raises(DataError) as err:
        task.build("train", 49, 0)
    message = str(err.value)
    assert "size=49" in message and "48 distinct problems" in message and "train" in message


def test_arithmetic_rejects_bad_split_and_size():
    task = get_task("arithmetic")
    with pytest.raises(DataError, match="split"):
        task.build("test", 3, 0)
    with pytest.raises(DataError, match="size"):
        task.build("train", -1, 0)
    assert len(task.build("train", 0, 0)) == 0
    assert task.build("train", 0, 0).column_names == STANDARD_COLUMNS


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("47 + 38 = 85", "85"),
        ("It is -7", "-7"),
        ("x = \u22127", "-7"),
        ("that makes 1,234 apples", "1234"),
        ("1,234,567", "1234567"),
        ("5-3=2", "2"),
        ("12 minus 20 is -8.", "-8"),
        ("$1,200.50", "1200.50"),
        ("mul1 has no number", None),
        ("", None),
        ("first 3, then 4", "4"),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "score"),
    [
        ("7 times 8 is 56.", "56", 1.0),
        ("7 times 8 is 54.", "56", 0.0),
        ("56, I think. Or maybe 57", "56", 0.0),  # the LAST number counts
        ("The result is -13", "-13", 1.0),
        ("The result is 13", "-13", 0.0),
        ("The sum is 1,309.", "1309", 1.0),
        ("The sum is 1309.0", "1309", 1.0),
        ("The sum is 1309.5", "1309", 0.0),
        ("I don't know", "12", 0.0),
        ("", "12", 0.0),
    ],
)
def test_arithmetic_score(completion, answer, score):
    assert ArithmeticTask({}).score(completion, answer) == score


def test_completion_text_handles_strings_and_conversations():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a 5"}]) == "a 5"
    multimodal = [{"role": "assistant", "content": [{"type": "text", "text": "is 9"}]}]
    assert completion_text(multimodal) == "is 9"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]) == "r"


def test_reward_function_shape_name_and_conversational_completions():
    task = get_task("arithmetic", {"op": "add"})
    reward = make_reward_function(task)
    assert reward.__name__ == "arithmetic_correct"
    prompts = [[{"role": "user", "content": "What is 1 + 2?"}]] * 3
    conversational = [
        [{"role": "assistant", "content": "1 + 2 = 3"}],
        [{"role": "assistant", "content": "It is 4"}],
        [{"role": "assistant", "content": "no idea"}],
    ]
    scores = reward(prompts, conversational, answer=["3", "3", "3"], trainer_state=None, metadata=["{}"] * 3)
    assert scores == [1.0, 0.0, 0.0]
    assert all(isinstance(s, float) for s in scores)
    assert reward(["a", "b"], ["3", "-1,000"], answer=["3", "-1000"]) == [1.0, 1.0]
    with pytest.raises(DataError, match="2 completions but 1 answers"):
        reward(["a", "b"], ["3", "3"], answer=["3"])


def test_reward_function_scores_a_built_dataset():
    task = get_task("arithmetic", {"op": "max"})
    ds = task.build("eval", 8, 1)
    reward = make_reward_function(task)
    right = [f"The larger one is {a}" for a in ds["answer"]]
    wrong = [f"The larger one is {int(a) + 1}" for a in ds["answer"]]
    assert reward(ds["prompt"], right, answer=ds["answer"], metadata=ds["metadata"]) == [1.0] * 8
    assert reward(ds["prompt"], wrong, answer=ds["answer"], metadata=ds["metadata"]) == [0.0] * 8


def test_max_does_not_credit_a_completion_that_names_the_smaller_number():
    task = get_task("arithmetic", {"op": "max", "digits": 2, "answer_format": "number_only"})
    meta = json.dumps({"op": "max", "operands": [17, 72]})
    assert task.score("72", "72", meta) == 1.0
    assert task.score("The answer is 72.", "72", meta) == 1.0
    assert task.score("17 is larger than 72.", "72", meta) == 0.0  # ends with 72 but answers 17
    assert task.score("72 is larger than 17.", "72", meta) == 0.0  # not "just the number": ambiguous, not credited
    assert task.score("17", "72", meta) == 0.0
    # the other ops keep the last-number rule: the worked expression may name the operands
    add = get_task("arithmetic", {"op": "add", "digits": 2})
    assert add.score("49 + 15 = 64", "64", json.dumps({"op": "add", "operands": [49, 15]})) == 1.0


# --------------------------------------------------------------------------------------------------------------------
# validation and lookup
# --------------------------------------------------------------------------------------------------------------------


def test_registry_holds_the_builtins():
    from opd_plugins.data.tasks import NumericAnswerTask

    assert TASKS == {"arithmetic": ArithmeticTask, "reasoning_gym": ReasoningGymTask,
                     "numeric_answer": NumericAnswerTask}


def test_numeric_answer_scores_against_the_last_number_of_the_reference():
    from opd_plugins.data.tasks import get_task
    from opd_plugins.errors import DataError

    task = get_task("numeric_answer")
    assert task.score("So she has 72 apples.", "48 + 24 = 72\n#### 72") == 1.0
    assert task.score("She has 71.", "#### 72") == 0.0
    assert task.score("no number", "#### 72") == 0.0
    with pytest.raises(DataError, match="only scores rows"):
        task.build("train", 4, 0)
    for name, cls in TASKS.items():
        assert cls.name == name
        assert cls.Params.model_config["extra"] == "forbid"
        assert cls.__doc__


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(DataError) as err:
        get_task("arithmetc", {})
    message = str(err.value)
    assert "Did you mean 'arithmetic'?" in message
    assert "registered: arithmetic, numeric_answer, reasoning_gym" in message
    assert isinstance(err.value, OPDError)


def test_validate_task_params_reports_every_problem_readably():
    problems = validate_task_params("arithmetic", {"op": "div", "digits": 9, "digit": 3})
    assert len(problems) == 3
    assert any(p.startswith("params.op: Input should be 'add', 'sub', 'mul' or 'max'") for p in problems)
    assert "params.digits: Input should be less than or equal to 6 [got 9]" in problems
    assert any(p.startswith("params.digit: unknown key 'digit'. Did you mean 'digits'?") for p in problems)
    assert validate_task_params("arithmetic", {"op": "mul", "digits": 1}) == []
    assert validate_task_params("arithmetic", None) == []


def test_validate_task_params_cross_field_checks():
    (problem,) = validate_task_params("arithmetic", {"op": "max", "operands": 3})
    assert problem.startswith("params: operands=3 is only supported for op add and mul")
    (problem,) = validate_task_params("arithmetic", {"question_template": "{a} and {c}?"})
    assert "unknown field(s) 'c'" in problem and "available: a, b, expression" in problem
    (problem,) = validate_task_params("arithmetic", {"digits": 2, "op": "add"} | {"operands": 1})
    assert problem.startswith("params.operands: Input should be greater than or equal to 2")


def test_get_task_raises_with_all_problems():
    with pytest.raises(DataError) as err:
        get_task("arithmetic", {"digits": 0, "op": "pow"})
    lines = str(err.value).splitlines()
    assert lines[0] == "task 'arithmetic' has 2 problems:"
    assert lines[1].startswith("  params.op: ") and lines[2].startswith("  params.digits: ")


# --------------------------------------------------------------------------------------------------------------------
# reasoning_gym
# --------------------------------------------------------------------------------------------------------------------

CHAIN_SUM = {"dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 3, "max_digits": 2}}
TINY_CHAIN_SUM = {"dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1}}


def test_reasoning_gym_chain_sum_builds_and_the_real_answer_scores_one():
    task = get_task("reasoning_gym", CHAIN_SUM)
    ds = task.build("train", 12, seed=0)
    assert ds.column_names == STANDARD_COLUMNS
    assert len(ds) == 12
    for row in ds:
        assert "arithmetic problem" in row["prompt"][0]["content"]
        assert row["task"] == "reasoning_gym"
        assert json.loads(row["metadata"])["source_dataset"] == "chain_sum"
        assert task.score(row["answer"], row["answer"], row["metadata"]) == 1.0
        assert task.score(f"Let's add.\n... = {row['answer']}", row["answer"], row["metadata"]) == 1.0
        assert task.score(f"<answer>{row['answer']}</answer> or 99999", row["answer"], row["metadata"]) == 1.0
        wrong = str(int(row["answer"]) + 1)
        assert task.score(f"The answer is {wrong}", row["answer"], row["metadata"]) == 0.0
    reward = make_reward_function(task)
    assert reward.__name__ == "reasoning_gym_correct"
    completions = [[{"role": "assistant", "content": f"= {a}"}] for a in ds["answer"]]
    assert reward(ds["prompt"], completions, answer=ds["answer"], metadata=ds["metadata"]) == [1.0] * 12


def test_reasoning_gym_is_deterministic_and_splits_are_disjoint():
    task = get_task("reasoning_gym", CHAIN_SUM)
    assert task.build("train", 20, 1).to_list() == task.build("train", 20, 1).to_list()
    assert questions(task.build("train", 30, 1))[:20] == questions(task.build("train", 20, 1))
    # a tiny problem space (1-digit, 2 terms) is where overlap would show
    small = get_task("reasoning_gym", TINY_CHAIN_SUM)
    train = set(questions(small.build("train", 60, 0))) | set(questions(small.build("train", 60, 1)))
    evals = set(questions(small.build("eval", 15, 0))) | set(questions(small.build("eval", 15, 1)))
    assert len(evals) >= 15
    assert not train & evals
    assert len(set(questions(small.build("train", 60, 0)))) == 60  # no repeats within a split
    assert EVAL_SEED_OFFSET == 1_000_003


def test_reasoning_gym_too_large_size_is_a_data_error():
    small = get_task("reasoning_gym", TINY_CHAIN_SUM)
    with pytest.raises(DataError, match=r"only \d+ distinct eval questions.*size=500"):
        small.build("eval", 500, 0)


def test_reasoning_gym_text_answers_use_the_last_line():
    task = get_task("reasoning_gym", {"dataset": "spell_backward", "answer_format": "number_only"})
    row = task.build("train", 1, 0)[0]
    assert row["prompt"][0]["content"].endswith("Reply with just the answer.")
    answer = row["answer"]
    assert task.score(f"Reversing it letter by letter:\n**Answer:** {answer}.", answer, row["metadata"]) == 1.0
    assert task.score(f"The answer is {answer}", answer, row["metadata"]) == 1.0
    assert task.score(f"{answer}\nHmm, not sure.", answer, row["metadata"]) == 0.0
    assert task.score("", answer, row["metadata"]) == 0.0
    assert ReasoningGymTask.extract_answer("line one\n\n `xyz` \n", "abc") == "xyz"
    assert ReasoningGymTask.extract_answer("so 12.0 in total", "12") == "12"
    assert ReasoningGymTask.extract_answer("no digits", "12") is None


def test_reasoning_gym_unknown_dataset_lists_close_matches():
    (problem,) = validate_task_params("reasoning_gym", {"dataset": "chain_summ"})
    assert "unknown reasoning-gym dataset 'chain_summ'" in problem
    assert "'chain_sum'" in problem
    with pytest.raises(DataError, match="Did you mean 'chain_sum'"):
        get_task("reasoning_gym", {"dataset": "chain_summ"})
    with pytest.raises(DataError, match="unknown reasoning-gym dataset"):
        ReasoningGymTask({"dataset": "chain_summ"}).build("train", 1, 0)


def test_reasoning_gym_config_problems():
    (problem,) = validate_task_params("reasoning_gym", {"dataset": "chain_sum", "config": {"terms": 3}})
    assert "'terms'" in problem and "min_terms" in problem
    (problem,) = validate_task_params("reasoning_gym", {"dataset": "chain_sum", "config": {"seed": 3}})
    assert "seed" in problem and "remove" in problem
    (problem,) = validate_task_params(
        "reasoning_gym", {"dataset": "chain_sum", "config": {"min_terms": 4, "max_terms": 2}}
    )
    assert problem.startswith("params.config: invalid config for chain_sum")
    assert validate_task_params("reasoning_gym", {}) == ["params.dataset: required key is missing"]


@pytest.mark.parametrize(
    "dataset",
    ["basic_arithmetic", "spell_backward", "arc_agi", "mini_sudoku", "tower_of_hanoi", "sentence_reordering"],
)
def test_reasoning_gym_real_answers_score_one_in_common_completion_shapes(dataset):
    task = get_task("reasoning_gym", {"dataset": dataset})
    for row in task.build("train", 2, seed=0):
        answer, metadata = row["answer"], row["metadata"]
        assert task.score(answer, answer, metadata) == 1.0
        assert task.score(f"Let me think.\nThe answer is:\n{answer}", answer, metadata) == 1.0
        assert task.score(f"<answer>\n{answer}\n</answer>", answer, metadata) == 1.0
        assert task.score("I give up.", answer, metadata) == 0.0


def test_metadata_round_trips_tuples():
    metadata = {"grid": ((1, 2), (3, 4)), "names": ["a", "b"], "n": 3, "nested": {"t": (1,)}}
    text = encode_metadata(metadata)
    assert json.loads(text)  # plain JSON in the column
    assert decode_metadata(text) == metadata
    assert isinstance(decode_metadata(text)["grid"][0], tuple)
    assert decode_metadata("") == {} and decode_metadata(None) == {}
