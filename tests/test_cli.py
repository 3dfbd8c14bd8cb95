"""The one CLI: global flags before or after the subcommand, --version, bare `kronos`, one-line errors, and the
finetune/ scripts as thin calls of it (same flags everywhere)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from kronos import __version__, cli

ROOT = Path(__file__).resolve().parents[1]


def test_bare_kronos_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: kronos" in out and "pipeline" in out and "examples:" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"kronos {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "config", "--set", "epochs=3"],
        ["config", "-q", "--set", "epochs=3"],
        ["config", "--set", "epochs=3", "--quiet"],
    ],
)
def test_global_flags_before_or_after_the_subcommand(argv, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "setup_logging", lambda quiet=False: seen.setdefault("quiet", quiet))
    assert cli.main(argv) == 0
    assert seen["quiet"] is True
    assert json.loads(capsys.readouterr().out)["epochs"] == 3


def test_set_is_repeatable_and_fast_mode_caps(capsys):
    from kronos.config import FAST_MODE_CAPS

    assert cli.main(["config", "--set", "epochs=50", "--set", "quantiles=[0.2, 0.8]", "--fast-mode", "--cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epochs"] == 50  # a key the user set wins over fast mode
    assert data["n_train_iter"] == FAST_MODE_CAPS["n_train_iter"]
    assert data["quantiles"] == [0.2, 0.8] and data["device"] == "cpu"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["config", "--set", "batch_sise=3"], ["batch_sise", "did you mean 'batch_size'"]),
        (["config", "--set", "epochs"], ["--set expects KEY=VALUE"]),
        (["config", "--config-path", "/no/such/file.json"], ["does not exist"]),
    ],
)
def test_user_errors_are_one_line_exit_1(argv, words, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["config"]) == 130


@pytest.mark.parametrize(
    "script, command",
    [
        ("train_complete_pipeline.py", "pipeline"),
        ("train_tokenizer.py", "train-tokenizer"),
        ("train_tokenizer_cpu.py", "train-tokenizer"),
        ("train_predictor.py", "train-predictor"),
        ("train_predictor_cpu.py", "train-predictor"),
        ("qlib_data_preprocess.py", "data"),
    ],
)
def test_every_script_is_the_same_command(script, command, monkeypatch):
    """Each finetune/ script parses the same flags as `kronos COMMAND` and runs the same dispatcher."""
    seen = {}

    def fake_run(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(sys, "argv", [script, "--config-path", "c.json", "--set", "epochs=2", "--fast-mode", "-q"])
    monkeypatch.syspath_prepend(str(ROOT / "finetune"))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "finetune" / script), run_name="__main__")
    assert e.value.code == 0
    assert seen["command"] == command and seen["config_path"] == "c.json" and seen["set"] == ["epochs=2"]
    assert seen["fast_mode"] and seen["quiet"]
    assert seen["cpu"] is script.endswith("_cpu.py")
    if script == "qlib_data_preprocess.py":
        assert seen["data_source"] == "qlib"
