"""Hostile recipe inputs (issue 13, items 1-5): each is refused with one clear line naming the file and the YAML
key or line, quickly, before any model loads, and never with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opd_plugins.errors import OPDError, RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.recipe.loader import parse_override
from test_bad_input import base  # noqa: F401 - the same valid recipe, as a fixture
from test_bad_input import write as write_recipe


def write(tmp_path, data, name="r.yaml"):
    if isinstance(data, bytes):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return write_recipe(tmp_path, data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), name)


def refused(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, list(overrides))
    msg = str(exc.value)
    assert str(path) in msg or exc.value.source == str(path)
    return msg


# -- 1. alias bombs ----------------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9, key: str = "description") -> str:
    """The billion-laughs shape: ``width ** levels`` strings from a few hundred bytes."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


@pytest.mark.parametrize("where", ["top", "trainer_args"])
def test_alias_bomb_is_refused_at_once(base, tmp_path, where):
    bomb = alias_bomb()
    if where == "trainer_args":
        bomb = bomb.replace("description: *l8", "trainer: {args: {per_device_train_batch_size: 4, extra: *l8}}")
    text = yaml.safe_dump({k: v for k, v in base.items() if k != "trainer" or where == "top"}) + bomb
    path = write(tmp_path, text)
    assert len(text.encode()) < 2000
    t0 = time.monotonic()
    msg = refused(path)
    assert time.monotonic() - t0 < 2
    assert "alias" in msg and "line" in msg, msg


def test_modest_aliases_and_merge_keys_still_work(base, tmp_path):
    text = yaml.safe_dump({k: v for k, v in base.items() if k != "trainer"})
    text += ("description: &d one anchor used twice\n"
             "trainer:\n  args:\n    <<: {per_device_train_batch_size: 4, num_generations: 4, max_steps: 9}\n"
             "    max_steps: 3\n    run_name: *d\n")
    recipe, _ = load_recipe(write(tmp_path, text))
    assert recipe.trainer.args["max_steps"] == 3 and recipe.trainer.args["run_name"] == recipe.description


def test_recursive_alias_is_refused(tmp_path):
    assert "recursive" in refused(write(tmp_path, "description: &a [*a]\n"))


# -- 2. encodings and nesting ------------------------------------------------------------------------------------


def test_utf16_latin1_and_bom(base, tmp_path):
    text = yaml.safe_dump(base)
    assert "UTF-16" in refused(write(tmp_path, text.encode("utf-16"), "u16.yaml"))
    assert "UTF-16" in refused(write(tmp_path, text.encode("utf-16-le"), "u16le.yaml"))
    latin = write(tmp_path, ("description: caf\xe9\n" + text).encode("latin-1"), "latin.yaml")
    msg = refused(latin)
    assert "not valid UTF-8" in msg and "line 1" in msg and "save it as UTF-8" in msg
    recipe, _ = load_recipe(write(tmp_path, b"\xef\xbb\xbf" + ("description: caf\xe9\n" + text).encode(), "bom.yaml"))
    assert recipe.description == "caf\xe9"


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    for text in ("description: " + "[" * 20000 + "]" * 20000, "a: " + "{b: " * 5000 + "1" + "}" * 5000):
        msg = refused(write(tmp_path, text))
        assert "nested" in msg and "levels deep" in msg and "RecursionError" not in msg


# -- 3. trainer.args values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, needle", [
    ("learning_rate", "fast", "must be a number"),
    ("learning_rate", 0, "must be > 0"),
    ("learning_rate", -1e-4, "must be > 0"),
    ("learning_rate", float("nan"), "must be a finite number"),
    ("learning_rate", float("inf"), "must be a finite number"),
    ("per_device_train_batch_size", 0, "must be >= 1"),
    ("per_device_train_batch_size", "four", "must be an integer"),
    ("per_device_train_batch_size", 2.5, "must be an integer"),
    ("max_steps", 0, "must be >= 1 (or -1"),
    ("max_steps", "ten", "must be an integer"),
    ("temperature", 0, "must be > 0"),
    ("temperature", float("-inf"), "must be a finite number"),
    ("top_p", 1.5, "must be in (0, 1]"),
    ("gradient_accumulation_steps", -2, "must be >= 1"),
    ("logging_steps", [1], "must be a number"),
    ("lr_scheduler_type", "cosin", "Did you mean 'cosine'?"),
    ("bf16", "yes please", "must be true, false or null"),
])
def test_trainer_arg_values_are_checked(base, tmp_path, key, value, needle):
    base["trainer"]["args"][key] = value
    msg = refused(write(tmp_path, base))
    assert f"trainer.args.{key}: " in msg and needle in msg, msg


def test_every_bad_value_reported_at_once_and_validate_never_loads_trl_twice(base, tmp_path):
    base["trainer"]["args"].update(learning_rate="x", max_steps=-5, temperature=float("nan"))
    msg = refused(write(tmp_path, base))
    assert "has 3 problems" in msg


def test_exponent_without_dot_is_a_number_in_overrides_and_files(base, tmp_path):
    path = write(tmp_path, yaml.safe_dump(base) + "")
    recipe, _ = load_recipe(path, ["trainer.args.learning_rate=1e-4"])
    assert recipe.trainer.args["learning_rate"] == 1e-4
    text = yaml.safe_dump(base).replace("max_steps: 2", "max_steps: 2\n    learning_rate: 3e-5")
    recipe, _ = load_recipe(write(tmp_path, text, "e.yaml"))
    assert recipe.trainer.args["learning_rate"] == 3e-5
    assert parse_override("a.b=1E3") == (["a", "b"], 1000.0)
    assert parse_override("a.b=v1e3") == (["a", "b"], "v1e3")


def test_quoted_numbers_are_the_numbers_meant(base, tmp_path):
    from opd_plugins.runs.opd import build_config

    base["trainer"]["args"].update(learning_rate="2e-4", max_steps="3")
    recipe, _ = load_recipe(write(tmp_path, base))
    config = build_config(recipe)
    assert config.learning_rate == 2e-4 and config.max_steps == 3


def test_soda_trainer_args_values(base, tmp_path):
    from opd_plugins.recipe.preference import arg_problems

    msgs = [str(p) for p in arg_problems({"learning_rate": 0, "temperature": float("inf"), "max_steps": "ten",
                                          "top_p": float("nan"), "max_completion_length": "long"})]
    assert "trainer.args.learning_rate: must be > 0 [got 0]" in msgs, msgs
    assert "trainer.args.temperature: must be a finite number [got inf]" in msgs, msgs
    assert "trainer.args.max_steps: must be an integer [got 'ten']" in msgs, msgs
    assert any(m.startswith("trainer.args.top_p: ") for m in msgs), msgs  # the snapshot's own check
    assert any(m.startswith("trainer.args.max_completion_length: ") for m in msgs), msgs
    assert not arg_problems({"temperature": 0, "learning_rate": "5e-7", "beta": 0.1, "loss_type": "ipo"})


# -- 4. output_dir -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, needle", [("", "is empty"), ("  ", "is empty"), ("/", "filesystem root"),
                                           ("//", "filesystem root"), ("~", "home directory")])
def test_output_dir_that_cannot_be_a_run_directory(base, tmp_path, value, needle):
    base["output_dir"] = value
    msg = refused(write(tmp_path, base))
    assert "output_dir: " in msg and needle in msg


def test_output_dir_tilde_is_expanded(base, tmp_path):
    base["output_dir"] = "~/opd-runs/x"
    recipe, _ = load_recipe(write(tmp_path, base))
    assert recipe.output_dir == os.path.expanduser("~/opd-runs/x") and "~" not in recipe.output_dir


def _train_refusal(recipe, **kw) -> str:
    from opd_plugins.runs import rundir

    with pytest.raises(OPDError) as exc:
        rundir.start_run(Path(recipe.output_dir), recipe, resume=kw.get("resume", False),
                         overwrite=kw.get("overwrite", False))
    return str(exc.value)


def test_output_dir_under_a_file_or_unwritable(base, tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    base["output_dir"] = str(blocker / "run")
    recipe, _ = load_recipe(write(tmp_path, base))
    assert f"{blocker} is a file, not a directory" in _train_refusal(recipe)
    base["output_dir"] = str(blocker)
    recipe, _ = load_recipe(write(tmp_path, base))
    assert "is a file, not a directory" in _train_refusal(recipe)
    locked = tmp_path / "locked"
    locked.mkdir()
    base["output_dir"] = str(locked / "run")
    recipe, _ = load_recipe(write(tmp_path, base))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert f"{locked} is not writable" in _train_refusal(recipe)


def test_overwrite_deletes_only_run_directories(base, tmp_path, monkeypatch):
    from opd_plugins.runs import rundir

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / "recipe.yaml").write_text("mine")  # one marker alone is not a run directory
    base["output_dir"] = str(precious)
    recipe, _ = load_recipe(write(tmp_path, base))
    msg = _train_refusal(recipe, overwrite=True)
    assert "not a run directory of opd_plugins" in msg and "not deleted" in msg
    assert (precious / "thesis.tex").exists()

    run = tmp_path / "oldrun"
    run.mkdir()
    for marker in ("recipe.yaml", "plugins.json"):
        (run / marker).write_text("{}")
    monkeypatch.chdir(run)
    base["output_dir"] = str(run)
    recipe, _ = load_recipe(write(tmp_path, base))
    assert "holds the current directory" in _train_refusal(recipe, overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert rundir.start_run(run, recipe, resume=False, overwrite=True).checkpoint is None
    assert not run.exists()


def test_cli_overwrite_of_current_directory_refused_without_traceback(base, tmp_path):
    """The issue's case: output_dir '' or '.' and --overwrite in a directory that is not a run."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    for value in ("", "."):
        base["output_dir"] = value
        path = write(tmp_path, base)
        out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "--overwrite"], cwd=work,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert (work / "keep.txt").exists()
        assert len(out.stderr.strip().splitlines()) <= 3, out.stderr


# -- 5. duplicate keys and size ----------------------------------------------------------------------------------


def test_duplicate_key_names_both_lines(base, tmp_path):
    text = yaml.safe_dump(base, sort_keys=False) + "output_dir: /tmp/elsewhere\n"
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("output_dir"))
    last = len(text.splitlines())
    msg = refused(write(tmp_path, text))
    assert f"duplicate key 'output_dir': first at line {first}, again at line {last}" in msg
    nested = "trainer:\n  args:\n    learning_rate: 1.0e-4\n    learning_rate: 1.0e-3\n"
    assert "duplicate key 'learning_rate': first at line 3, again at line 4" in refused(write(tmp_path, nested))


def test_huge_recipes_are_refused_by_size_quickly(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write("description: |\n")
        line = "  " + "x" * 1000 + "\n"
        for _ in range(50_000):  # ~50 MB
            f.write(line)
    t0 = time.monotonic()
    msg = refused(big)
    assert time.monotonic() - t0 < 1 and "bytes, more than" in msg
    many = write(tmp_path, "description: [" + "1, " * 25_000 + "]\n", "many.yaml")
    t0 = time.monotonic()
    msg = refused(many)
    assert time.monotonic() - t0 < 5 and "more than 20,000 values" in msg


def test_override_alias_bomb_is_refused(base, tmp_path):
    items = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = write(tmp_path, base)
    t0 = time.monotonic()
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["description=[" + ", ".join(items) + "]"])
    assert time.monotonic() - t0 < 2
    assert "override description=...: refused YAML" in str(exc.value) and "alias" in str(exc.value)
