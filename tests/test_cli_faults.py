"""Environment faults (full disk, read-only folder) end the CLI with one line, exit 1 and no partial file."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pandas as pd
import pytest

from kronos import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "parity-tiny" / "tiny"
CSV = ROOT / "tests" / "fixtures" / "kline_5min.csv"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, capsys, code):
    def failing_to_csv(self, path, *args, **kwargs):
        Path(path).write_text("half a fil")  # the disk fills up in the middle of the write
        raise OSError(code, __import__("os").strerror(code), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    out = tmp_path / "out" / "forecast.csv"
    rc = cli.main(
        [
            "forecast",
            "--input",
            str(CSV),
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--pred-len",
            "2",
            "--lookback",
            "64",
            "--output",
            str(out),
        ]
    )
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]  # (tqdm progress goes to stderr too)
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: cannot write"), stderr
    assert "Traceback" not in stderr
    assert __import__("os").strerror(code) in err[0]
    assert list(out.parent.iterdir()) == []  # the temporary file is gone, no partial forecast


def test_other_os_errors_are_not_hidden(monkeypatch):
    def boom(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setitem(cli.COMMANDS, "forecast", dataclasses.replace(cli.COMMANDS["forecast"], handler=boom))
    with pytest.raises(OSError, match="Input/output"):
        cli.main(["forecast", "--input", str(CSV), "--tokenizer", "x", "--model", "y", "--pred-len", "2"])
