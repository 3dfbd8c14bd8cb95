"""The READMEs as a newcomer follows them: every `kronos ...`, `python finetune/...` and torchrun command they show
parses with the real parser (the flags exist, required ones are given), and the Quick start Python block runs."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kronos import cli

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", ROOT / "README_CN.md"]
TINY = ROOT / "tests" / "fixtures" / "parity-tiny" / "tiny"
SCRIPTS = {
    "train_complete_pipeline": "pipeline",
    "train_tokenizer": "train-tokenizer",
    "train_tokenizer_cpu": "train-tokenizer",
    "train_predictor": "train-predictor",
    "train_predictor_cpu": "train-predictor",
    "qlib_data_preprocess": "data",
}


def shown_commands(text: str) -> tuple[list[str], list[str]]:
    """(command lines of the bash blocks, inline `kronos ...` spans); lines with placeholders (<x>, [...]) left out."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #")[0].strip())
    keep = ("kronos ", "python finetune/", "python -m kronos.cli", "torchrun ")
    spans = [s.strip() for s in re.findall(r"`(kronos [^`]+)`", text)]
    return (
        [ln for ln in lines if ln.startswith(keep) and not re.search(r"<|\[-|\.\.\.|…", ln)],
        [sp for sp in spans if not re.search(r"<|\[|\.\.\.|…", sp)],
    )


def parse(line: str) -> None:
    """Parse a full command line with the parser that runs it (SystemExit(1) with one line when it is wrong)."""
    tokens = shlex.split(line)
    if tokens[0] == "torchrun":  # drop torchrun's own options
        tokens = ["python", *tokens[next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "-m") :]]
    if tokens[0] == "kronos":
        cli.build_parser().parse_args(tokens[1:])
    elif tokens[:3] == ["python", "-m", "kronos.cli"]:
        cli.build_parser().parse_args(tokens[3:])
    else:
        assert tokens[0] == "python" and tokens[1].startswith("finetune/"), line
        assert (ROOT / tokens[1]).is_file(), tokens[1]
        cli.script_parser(SCRIPTS[Path(tokens[1]).stem], Path(tokens[1]).name).parse_args(tokens[2:])


def unknown_flags(span: str) -> list[str]:
    """Flags of an inline `kronos COMMAND --flag ...` mention that COMMAND does not have (fragments allowed)."""
    tokens = shlex.split(span)
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if len(tokens) < 2 or tokens[1].startswith("-"):
        known = parser._option_string_actions
    else:
        assert tokens[1] in commands, f"`{span}`: no command {tokens[1]!r}"
        known = commands[tokens[1]]._option_string_actions
    return [t for t in tokens if t.startswith("-") and t.split("=")[0] not in known]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_every_command_shown_parses(readme, capsys):
    lines, spans = shown_commands(readme.read_text(encoding="utf-8"))
    assert len(lines) >= 15 and len(spans) >= 5
    bad = []
    for line in lines:
        try:
            parse(line)
        except SystemExit as exc:
            if exc.code != 0:  # --help / --version exit 0
                bad.append(f"{line}  ->  {capsys.readouterr().err.strip()}")
    bad += [f"`{span}`: unknown flag(s) {unknown_flags(span)}" for span in spans if unknown_flags(span)]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_quick_start_python_runs(readme, tmp_path):
    text = readme.read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # the first Python block: the Quick start
    assert "./Kronos-Tokenizer-base" in code and "./Kronos-small" in code
    # the README downloads these two folders first (a network step); the tiny checkpoints stand in for them here
    (tmp_path / "Kronos-Tokenizer-base").symlink_to(TINY / "tokenizer")
    (tmp_path / "Kronos-small").symlink_to(TINY / "predictor")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "close" in r.stdout  # the printed band widths


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_every_symbol_the_serve_and_mcp_examples_ask_for_is_in_the_bundled_sample(readme):
    """The serve/MCP examples run against `make demo`'s dataset: their symbols are bars of the bundled sample."""
    text = readme.read_text(encoding="utf-8")
    asked = set(re.findall(r"/symbols/([A-Za-z0-9.]+)/forecast", text))
    asked |= set(re.findall(r'"symbol": "([A-Za-z0-9.]+)"', text))
    assert asked or readme.name != "README.md", "no dataset symbol in the serve/MCP examples"
    features = ROOT / "examples" / "data" / "qlib_cn_demo" / "features"
    for symbol in asked:
        folder = features / symbol.lower()
        assert (folder / "close.day.bin").is_file(), f"{readme.name} asks for {symbol}, which the sample does not hold"
