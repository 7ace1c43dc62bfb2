"""Loading datasets from local files (and the hub, offline) into the framework's column layout."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets
import pytest
from pydantic import ValidationError

from opd_plugins.data.loading import DatasetSource, check_columns, load_source
from opd_plugins.errors import DataError

ROWS = [
    {"question": "What is 2 + 3?", "solution": 5, "level": "easy"},
    {"question": "What is 10 - 4?", "solution": 6, "level": "easy"},
    {"question": "What is 7 times 8?", "solution": 56, "level": "hard"},
]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_local_jsonl_with_column_mapping_becomes_conversational_with_hints(jsonl):
    src = DatasetSource(path=str(jsonl), columns={"prompt": "question", "answer": "solution"})
    ds = load_source(src, required=("prompt", "answer"))
    assert len(ds) == 3
    assert set(ds.column_names) == {"prompt", "answer", "hint", "level"}
    assert ds[0]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert ds["answer"] == ["5", "6", "56"]  # integers become strings
    assert ds[2]["hint"] == "(Hint: the correct answer is 56.)"


def test_system_prompt_limit_and_custom_hint_template(jsonl):
    src = DatasetSource(
        path=str(jsonl),
        columns={"prompt": "question", "answer": "solution"},
        system_prompt="Answer briefly.",
        hint_template="({level} problem; answer: {answer})",
        limit=2,
    )
    ds = load_source(src)
    assert len(ds) == 2
    assert ds[1]["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 10 - 4?"},
    ]
    assert ds[1]["hint"] == "(easy problem; answer: 6)"


def test_hint_template_with_an_unknown_field_names_the_columns(jsonl):
    src = DatasetSource(path=str(jsonl), columns={"prompt": "question", "answer": "solution"}, hint_template="{why}")
    with pytest.raises(DataError) as err:
        load_source(src)
    assert "'why'" in str(err.value) and "level" in str(err.value)


def test_existing_hint_is_kept_and_conversational_prompts_get_the_system_prompt_once(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "q1"}], "answer": "a1", "hint": "given"},
        {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "q2"}], "answer": "a2",
         "hint": "given too"},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    ds = load_source(DatasetSource(path=str(path), system_prompt="sys"), required=("prompt", "answer", "hint"))
    assert ds["hint"] == ["given", "given too"]
    assert ds[0]["prompt"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}]
    assert ds[1]["prompt"] == [{"role": "system", "content": "own"}, {"role": "user", "content": "q2"}]


def test_conversational_prompts_without_system_prompt_are_untouched(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    ds = load_source(DatasetSource(path=str(path)))
    assert ds.column_names == ["prompt"]
    assert ds[0]["prompt"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_files(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    table = datasets.Dataset.from_list([{"question": r["question"], "solution": r["solution"]} for r in ROWS])
    getattr(table, f"to_{fmt}")(str(path))
    src = DatasetSource(path=str(path), columns={"prompt": "question", "answer": "solution"})
    ds = load_source(src, required=("prompt", "answer", "hint"))
    assert ds["answer"] == ["5", "6", "56"]
    assert ds[1]["prompt"] == [{"role": "user", "content": "What is 10 - 4?"}]


def test_save_to_disk_directory_and_its_splits(tmp_path):
    table = datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}])
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dd"))
    ds = load_source(DatasetSource(path=str(tmp_path / "dd"), split="test"))
    assert ds[0]["prompt"] == [{"role": "user", "content": "p"}]
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_source(DatasetSource(path=str(tmp_path / "dd"), split="validation"))


def test_missing_required_columns_list_what_the_dataset_has_and_the_mapping_to_add(jsonl):
    with pytest.raises(DataError) as err:
        load_source(DatasetSource(path=str(jsonl)), required=("prompt", "answer"))
    message = str(err.value)
    assert str(jsonl) in message
    assert "missing required column(s) prompt, answer" in message
    assert "it has: question, solution, level" in message
    assert "columns: {prompt: question, answer: solution}" in message


def test_mapping_to_a_column_the_dataset_lacks(jsonl):
    with pytest.raises(DataError) as err:
        load_source(DatasetSource(path=str(jsonl), columns={"prompt": "query"}))
    assert "'query'" in str(err.value) and "question, solution, level" in str(err.value)


def test_local_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"local path '{missing}' does not exist"):
        load_source(DatasetSource(path=str(missing)))
    with pytest.raises(DataError, match="does not exist"):
        load_source(DatasetSource(path="./definitely/not/here"))


def test_malformed_file_is_a_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="could not read"):
        load_source(DatasetSource(path=str(path)))


def test_hub_failure_offline_is_a_data_error_with_the_cause(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_source(DatasetSource(path="someorg/some-dataset", name="main"))
    message = str(err.value)
    assert "someorg/some-dataset" in message and "hub" in message
    assert "ConnectionError" in message  # the underlying error is kept


def test_check_columns_passes_and_fails():
    ds = datasets.Dataset.from_list([{"problem": "x", "target": "1"}])
    check_columns(ds, ["problem"], "my source")  # no error
    with pytest.raises(DataError) as err:
        check_columns(ds, ["prompt", "answer"], "my source")
    message = str(err.value)
    assert message.startswith("my source is missing required column(s) prompt, answer")
    assert "it has: problem, target" in message
    assert "columns: {prompt: problem, answer: target}" in message


def test_dataset_source_validation():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DatasetSource(path="x", colums={})
    with pytest.raises(ValidationError, match="named fields"):
        DatasetSource(path="x", hint_template="answer: {}")
    with pytest.raises(ValidationError):
        DatasetSource(path="x", limit=0)
    assert DatasetSource(path="x").hint_template == "(Hint: the correct answer is {answer}.)"
