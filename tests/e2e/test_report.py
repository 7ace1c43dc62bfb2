"""``opd_plugins.report``: run directories (hand-made and from a real tiny training run) into an HTML page, checked
as a real headless Chromium renders it (DOM and screenshot)."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from opd_plugins.errors import OPDError
from opd_plugins.report import build_report, load_run
from opd_plugins.report.cli import add_arguments, main

GROUPS = ("opd", "diag", "teacher", "correction", "rollout", "prompt_selection", "sampler", "token_weighting",
          "rewards", "train")
EVIL_Q = "What is <script>alert('x')</script> 3 + 4?"
EVIL_COMPLETION = "7</pre><script>document.title='pwned'</script>"
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# A headless browser
# ---------------------------------------------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    msg = "Chromium is not installed: apt-get install -y --no-install-recommends chromium"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def browse(html: Path, tmp_path: Path) -> tuple[str, Path]:
    """(the DOM after Chromium loaded ``html``, a 1280x2000 screenshot of it)."""
    exe = chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = html.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / f"{html.parent.name}-screenshot.png"
    out = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2000", url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    return dom.stdout, shot


class Dom(HTMLParser):
    """Start tags with their attributes and every piece of text (character references decoded)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.texts.append(data)

    def text(self) -> str:
        return "".join(self.texts)


def table_rows(dom: str, cls: str) -> list[list[str]]:
    """The cell texts of each row of ``<table class=cls>``."""
    m = re.search(rf'<table class="{cls}">(.*?)</table>', dom, re.S)
    assert m, f"no table of class {cls}"
    return [[Dom(c).text().strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.S)]


def check_page(dom: str, shot: Path, *, title: str, n_runs: int, n_images: int) -> Dom:
    import matplotlib.image as mpimg

    parsed = Dom(dom)
    assert re.search(r"<title>(.*?)</title>", dom, re.S).group(1) == title
    sections = [a for t, a in parsed.tags if t == "section" and a.get("class") == "run"]
    assert [s["id"] for s in sections] == [f"run-{i + 1}" for i in range(n_runs)]
    assert not [t for t, _ in parsed.tags if t == "script"], "the page has a script element"
    imgs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(imgs) == n_images
    for src in imgs:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG)
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and pixels[..., :3].var() > 0
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# Hand-made run directories
# ---------------------------------------------------------------------------------------------------------------


def _recipe(divergence: str, lr: float, token_weighting: list) -> dict:
    return {"description": f"{divergence} run", "model": {"name_or_path": "tiny", "lora": {"r": 4}},
            "data": {"task": {"name": "arithmetic", "params": {"op": "add"}}, "train_size": 16, "eval_size": 4},
            "trainer": {"name": "opd", "args": {"learning_rate": lr, "max_steps": 5}},
            "teacher": {"name": "self_context", "params": {}}, "divergence": {"name": divergence, "params": {}},
            "token_weighting": token_weighting, "evaluation": {"num_prompts": 4}, "output_dir": "x", "seed": 0}


def _eval(acc: float, examples: list) -> dict:
    return {"accuracy": acc, "n": 4, "stderr": (acc * (1 - acc) / 4) ** 0.5, "temperature": 0.0, "examples": examples}


def make_run(path: Path, divergence: str, lr: float, token_weighting: list, before: float, after: float) -> Path:
    path.mkdir(parents=True)
    recipe = _recipe(divergence, lr, token_weighting)
    (path / "recipe.yaml").write_text(f"# resolved from recipes/{divergence}.yaml\n" + yaml.safe_dump(recipe,
                                                                                                     sort_keys=False))
    (path / "plugins.json").write_text(json.dumps([{"name": "opd_plugins.teachers", "dist": "opd-plugins",
                                                    "version": "0.1.0"}]))
    starts = [{"opd_plugins": "0.1.0", "torch": "2.13.0", "argv": ["opd-plugins", "train"],
               "started": f"2026-01-0{i + 1}T10:00:00"} for i in range(2)]
    (path / "run_info.json").write_text("".join(json.dumps(s) + "\n" for s in starts))

    def row(step, t, scale=1.0):
        return {"step": step, "time": t, "loss": scale / step, "reward": 0.1 * step, "learning_rate": lr,
                "opd/divergence": 2.0 / step, "teacher/entropy": 1.5, "correction/ratio_mean": 1.0,
                "rollout/staleness": 0.0, "token_weighting/mean_weight": 0.9, "rewards/correct/mean": 0.1 * step,
                "diag/top1_agreement": 0.5 + 0.05 * step, "prompt_selection/degenerate_frac": 0.4,
                "sampler/role/none": 0.75}

    # steps 1-3, a crash, a resume from checkpoint-2 that logs step 3 again, then 4, 5 and a torn last line
    lines = [json.dumps(row(s, 1000 + 2 * s, scale=9.0 if s == 3 else 1.0)) for s in (1, 2, 3)]
    lines += [json.dumps(row(s, 1100 + 2 * s)) for s in (3, 4, 5)]
    lines.append(json.dumps({"step": 5, "time": 1111.0, "train_runtime": 12.5, "train_loss": 0.3}))
    lines.append('{"step": 6, "time": 1112.0, "loss": 0.')
    (path / "metrics.jsonl").write_text("\n".join(lines))
    examples = [{"question": EVIL_Q, "answer": "<b>7</b>", "completion": EVIL_COMPLETION, "score": 1.0},
                {"question": "What is 1 + 1?", "answer": "2", "completion": "\n\n\n", "score": 0.0}]
    (path / "eval_before.json").write_text(json.dumps(_eval(before, examples)))
    summary = {"recipe": "r.yaml", "output_dir": str(path), "before": _eval(before, examples), "train_seconds": 20.0,
               "steps": 5, "after": _eval(after, examples)}
    (path / "eval_summary.json").write_text(json.dumps(summary))
    for step, complete in ((2, True), (4, False)):
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if complete:
            (path / f"checkpoint-{step}" / "opd_checkpoint_complete").write_text("")
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path / "runs" / "rkl", "reverse_kl", 1e-5, [], before=0.25, after=0.75)
    b = make_run(tmp_path / "runs" / "fkl", "forward_kl", 3e-5, [{"name": "entropy", "params": {"top": 0.2}}],
                 before=0.5, after=0.25)
    return a, b


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*")) if "report" not in p.relative_to(path).parts}


def test_load_run_reads_a_resumed_run_with_a_torn_last_line(two_runs):
    run = load_run(two_runs[0])
    assert run.name == "rkl" and run.recipe["divergence"]["name"] == "reverse_kl"
    assert run.recipe_source == "recipes/reverse_kl.yaml" and run.recipe_text.startswith("# resolved from")
    assert [r["step"] for r in run.metrics] == [1, 2, 3, 4, 5]
    assert run.metrics[2]["loss"] == pytest.approx(1 / 3) and run.metrics[2]["time"] == 1106  # the resumed row wins
    assert run.train_summary["train_runtime"] == 12.5 and "train_runtime" not in run.metric_names()
    assert run.warnings == []  # a torn last line is expected after a kill: skipped silently
    assert [(c.step, c.complete) for c in run.checkpoints] == [(2, True), (4, False)]
    assert run.timings.seconds_per_step == pytest.approx(2.0)  # the median ignores the pause before the resume
    assert (run.timings.steps, run.timings.train_seconds, run.timings.train_runtime) == (5, 20.0, 12.5)
    assert run.eval_before["accuracy"] == 0.25 and run.eval_after["accuracy"] == 0.75
    assert run.examples["after"][0]["question"] == EVIL_Q
    assert len(run.run_info) == 2 and run.started == "2026-01-01T10:00:00"
    assert run.plugins[0]["name"] == "opd_plugins.teachers"


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "file.txt", tmp_path / "missing"):
        with pytest.raises(OPDError, match="not a run directory of opd_plugins") as err:
            build_report([bad], out=tmp_path / "out")
        assert str(bad) in str(err.value)
    assert main([str(tmp_path / "empty")]) == 2
    assert "not a run directory of opd_plugins" in capsys.readouterr().err


def test_report_of_one_run_goes_into_the_run_dir_and_changes_nothing_else(two_runs):
    run_dir = two_runs[0]
    before = snapshot(run_dir)
    html = build_report([run_dir])
    assert html == run_dir / "report" / "report.html"
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in html.parent.glob("*.png")) == sorted(
        ["accuracy.png", *(f"curves-{g}.png" for g in GROUPS)])
    text = html.read_text()
    assert "<script" not in text and "&lt;script&gt;alert(" in text and "&lt;b&gt;7&lt;/b&gt;" in text
    assert 'id="recipe-diff"' not in text and "✗ incomplete" in text and "✓ complete" in text
    assert "(blank:" in text  # a whitespace-only completion is shown as such


def test_report_of_two_runs_in_a_browser(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(p) for p in two_runs]) == 0
    html = Path(capsys.readouterr().out.strip())
    assert html.parent.parent == tmp_path and re.fullmatch(r"report-\d{8}-\d{6}", html.parent.name)
    dom, shot = browse(html, tmp_path)
    page = check_page(dom, shot, title="Training report: rkl, fkl", n_runs=2, n_images=1 + len(GROUPS))
    diff = {r[0]: r[1:] for r in table_rows(dom, "recipe-diff")}
    assert diff["divergence.name"] == ["reverse_kl", "forward_kl"]
    assert diff["trainer.args.learning_rate"] == ["1e-05", "3e-05"]
    assert diff["token_weighting"] == ["[]", "[entropy(top=0.2)]"] and "teacher.name" not in diff
    acc = table_rows(dom, "accuracy")
    assert acc[0] == ["run", "before", "± s.e.", "after", "± s.e.", "change", "n"]
    assert acc[1] == ["rkl", "0.250", "0.217", "0.750", "0.217", "+0.500", "4"]
    assert acc[2] == ["fkl", "0.500", "0.250", "0.250", "0.217", "-0.250", "4"]
    assert [r[:2] for r in table_rows(dom, "checkpoints")[1:]] == [["2", "✓ complete"], ["4", "✗ incomplete"]]
    timings = table_rows(dom, "timings")
    assert timings[1][:4] == ["rkl", "5", "20.0", "2.000"]
    text = page.text()
    assert EVIL_Q in text and EVIL_COMPLETION in text and "<b>7</b>" in text  # shown as text, not markup
    assert "Unified diff of recipe.yaml: rkl → fkl" in text


def test_a_sparse_or_damaged_run_still_gets_a_report(tmp_path):
    run_dir = tmp_path / "crashed"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(_recipe("reverse_kl", 1e-5, [])))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "loss": 2.0}\nnot json\n{"step": 2, "time": 3.0}\n')
    (run_dir / "eval_summary.json").write_text("{")
    run = load_run(run_dir)
    assert [r["step"] for r in run.metrics] == [1, 2] and run.recipe_source is None
    assert run.eval_before is None and run.eval_after is None and run.checkpoints == [] and run.run_info == []
    assert any("line 2" in w for w in run.warnings) and any("eval_summary.json" in w for w in run.warnings)
    text = build_report(run_dir, out=tmp_path / "out").read_text()
    assert "metrics.jsonl line 2 is not a JSON object; skipped" in text and "No checkpoint-N directories." in text
    assert "No run has a held-out evaluation" in text and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "curves-train.png", "report.html"]


def test_cli_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["a", "b", "--out", "o"])
    assert args.run_dirs == ["a", "b"] and args.out == "o"
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_import_is_cheap():
    code = ("import sys, opd_plugins.report, opd_plugins.report.cli; "
            "print([m for m in ('matplotlib', 'jinja2', 'torch', 'transformers', 'yaml') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ---------------------------------------------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------------------------------------------


def test_report_of_a_real_training_run(tmp_path, opd_tiny_model_dir):
    recipe = {
        "description": "tiny run for the report test",
        "model": {"name_or_path": str(opd_tiny_model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"op": "add", "digits": 1}}, "train_size": 16,
                 "eval_size": 4},
        "trainer": {"args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                             "max_completion_length": 8, "save_steps": 1, "logging_steps": 1}},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 1.0, "divergence": 0.5},
        "evaluation": {"num_prompts": 4, "max_new_tokens": 8},
        "output_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "real-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), f"output_dir={run_dir}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    files = snapshot(run_dir)
    rep = subprocess.run([sys.executable, "-m", "opd_plugins.report.cli", str(run_dir), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr[-4000:]
    html = Path(rep.stdout.strip())
    assert html == tmp_path / "rep" / "report.html" and snapshot(run_dir) == files

    run = load_run(run_dir)
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert [r["step"] for r in run.metrics] == [1, 2] and "loss" in run.metrics[-1] and run.warnings == []
    assert [(c.step, c.complete) for c in run.checkpoints] == [(1, True), (2, True)]
    assert run.timings.steps == 2 and run.timings.seconds_per_step > 0
    groups = sorted(p.stem.removeprefix("curves-") for p in html.parent.glob("curves-*.png"))
    assert {"opd", "rewards", "train"} <= set(groups)

    dom, shot = browse(html, tmp_path)
    check_page(dom, shot, title="Training report: real-run", n_runs=1, n_images=1 + len(groups))
    b, a = summary["before"], summary["after"]
    assert table_rows(dom, "accuracy")[1] == [
        "real-run", f"{b['accuracy']:.3f}", f"{b['stderr']:.3f}", f"{a['accuracy']:.3f}", f"{a['stderr']:.3f}",
        f"{a['accuracy'] - b['accuracy']:+.3f}", str(a["n"])]
    settings = {r[0]: r[1] for r in table_rows(dom, "settings")}
    assert settings["divergence"] == "reverse_kl" and settings["trainer.args.max_steps"] == "2"
    assert settings["objective.divergence"] == "constant(value=0.5)"
