"""The README, run as written: its blocks marked `<!-- tested -->` (shell commands and Python
snippets), in a scratch directory on CPU, so it cannot drift from the code.

Shell blocks: each `python ...` command runs (the `python -m venv`, `. .venv/bin/activate` and
`pip install` steps are what this environment already did). Python blocks run after them, in
the same directory, so they can use the quick start's `runs/tiny`. Every Python block is tested
or marked `<!-- not tested: why -->`. The quick start's printed output in the README must keep
the real output's line heads.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
SETUP = ("python -m venv ", ". .venv/bin/activate", "pip install ")


def readme_blocks() -> list[dict]:
    """Fenced blocks: language, text, the HTML comment just before the fence, line number."""
    blocks, lines = [], open(README).read().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        before = [ln.strip() for ln in lines[:i] if ln.strip()]
        marker = before[-1] if before and before[-1].startswith("<!--") else ""
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        text = "\n".join(lines[i + 1 : end])
        blocks.append({"lang": fence.group(1), "text": text, "marker": marker, "line": i + 1})
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
TESTED = [b for b in BLOCKS if b["marker"] == "<!-- tested -->"]
PYTHON = [b for b in TESTED if b["lang"] == "python"]


def commands(block: dict) -> list[str]:
    """The block's `python ...` commands, continuation lines joined, setup steps left out."""
    text = re.sub(r"\\\n\s*", " ", block["text"])
    found = []
    for line in text.splitlines():
        for part in (p.strip() for p in line.split("&&")):
            if part and not part.startswith("#") and not part.startswith(SETUP):
                assert part.startswith("python "), f"README line {block['line']}: {part!r}"
                found.append(part)
    return found


COMMANDS = [c for b in TESTED if b["lang"] == "bash" for c in commands(b)]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, one_device_env):
    """Every tested command, started together in a scratch directory holding train.py and
    configs/ (as a fresh clone does); their results in README order."""
    where = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "configs"):
        os.symlink(os.path.join(REPO, name), where / name)
    procs = [
        subprocess.Popen(
            [sys.executable, *shlex.split(cmd)[1:]],
            cwd=where,
            env=one_device_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in COMMANDS
    ]
    results = []
    for cmd, proc in zip(COMMANDS, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        results.append((cmd, proc.returncode, out, err))
    return where, results


def test_readme_tests_its_key_commands():
    assert any(c.startswith("python train.py --config=configs/default.py:tiny") for c in COMMANDS)
    assert any(c.startswith("python -m jepa_jax.masks") and "--png" in c for c in COMMANDS)
    assert any(c.startswith("python -m jepa_jax.bench") and "--plot" in c for c in COMMANDS)
    assert any("load_encoder(" in b["text"] for b in PYTHON)


def test_every_python_snippet_is_tested_or_says_why():
    for b in BLOCKS:
        if b["lang"] == "python":
            assert b["marker"] == "<!-- tested -->" or b["marker"].startswith(
                "<!-- not tested: "
            ), f"README line {b['line']}: mark it <!-- tested --> or <!-- not tested: why -->"


def test_commands_run_as_written(ran):
    where, results = ran
    for cmd, code, out, err in results:
        assert code == 0, f"{cmd}\n{out[-2000:]}\n{err[-3000:]}"
    for made in ("runs/tiny/metrics.jsonl", "runs/tiny/checkpoints/30", "masks.png"):
        assert (where / made).exists(), made
    assert any(
        n.startswith("events.out.tfevents") for n in os.listdir(where / "runs/tiny/tensorboard")
    )
    assert (where / "attention.png").exists()


def _head(line: str) -> str:
    return line.split()[0] if line.split() else ""


def test_quick_start_output_is_what_the_readme_shows(ran):
    _, results = ran
    out = next(o for c, _, o, _ in results if c.startswith("python train.py"))
    shown = next(b for b in BLOCKS if b["marker"] == "<!-- output of the quick start -->")
    real = [_head(line) for line in out.splitlines()]
    for line in shown["text"].splitlines():
        assert _head(line) in real, f"README shows {line!r}; the run printed:\n{out}"
    readme_steps = [ln.split()[1] for ln in shown["text"].splitlines() if ln.startswith("step ")]
    assert readme_steps == [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")]


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b['line']}" for b in PYTHON])
def test_python_snippet(block, ran, monkeypatch):
    where, _ = ran
    monkeypatch.chdir(where)
    exec(compile(block["text"], f"README.md:{block['line']}", "exec"), {"__name__": "readme"})
