"""Names are data, never paths: the one sanitiser and the inside-the-folder check."""

from __future__ import annotations

import pytest

from kronos.errors import InputError
from kronos.paths import MAX_NAME, path_in, safe_filename


@pytest.mark.parametrize(
    "value",
    [
        "x/../../../../tmp/ESCAPED",
        "../..",
        "..",
        ".",
        "",
        "/etc/passwd",
        "C:\\Windows\\evil",
        "a\x00b",
        "NUL",
        "con.txt",
        "a" * 500,
        "  spaced out  ",
        "🙂/🙃",
    ],
)
def test_hostile_names_become_one_plain_component(tmp_path, value):
    name = safe_filename(value)
    assert name and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name) <= MAX_NAME and not name.startswith(".")
    assert name.split(".")[0].lower() not in ("nul", "con")
    path = path_in(tmp_path, f"forecast_{name}.png")
    path.write_text("x")  # writable, and inside the folder
    assert path.parent == tmp_path


def test_plain_names_are_kept_and_changed_ones_stay_distinct():
    for plain in ["AAA", "sh600000", "000001.SZ", "BRK-B", "贵州茅台", "close_q0.1"]:
        assert safe_filename(plain) == plain
    assert safe_filename("a/b") != safe_filename("a_b") != safe_filename("a?b")
    assert safe_filename("a/b").startswith("a_b-")
    assert safe_filename("a" * 500) != safe_filename("a" * 501)


def test_path_in_refuses_what_resolves_outside(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    for bad in ["../x.png", "/tmp/x.png", "sub/../../x.png", "link/x.png"]:
        with pytest.raises(InputError, match="outside the folder") as info:
            path_in(tmp_path / "out", bad)
        assert "\n" not in str(info.value)
    assert path_in(tmp_path / "out", "sub/x.png") == tmp_path / "out" / "sub" / "x.png"
