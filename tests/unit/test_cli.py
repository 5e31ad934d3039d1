"""splitclip.cli: every subcommand has a --help, and user errors are messages, not tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitclip.cli import commands, main


@pytest.mark.parametrize("path", [c[0] for c in commands()], ids=lambda p: " ".join(p))
def test_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: splitclip" in capsys.readouterr().out


def test_top_level_help_is_fast_and_light() -> None:
    code = "import sys; from splitclip.cli import build_parser; build_parser(); print(sorted({'torch','ray','transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_bundle_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(tmp_path / "x.png"), "--bundle", str(tmp_path), "--prompt", "a"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_local_classify(tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    assert (
        main(["classify", str(img), "--bundle", str(tiny_bundle_dir), "--prompt", "red", "--prompt", "blue"])
        == 0
    )
    out = capsys.readouterr().out
    assert "img.png" in out and "red" in out
