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


# -- expected user errors: one line on stderr, a non-zero exit, no traceback --------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert needle in err, err
    assert err.strip().count("\n") == 0, err


def test_classify_answers_the_good_images_and_names_each_bad_one(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])  # a PNG header and a truncated body
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    argv = ["classify", str(good), str(corrupt), str(text), str(missing), "--bundle", str(tiny_bundle_dir)]
    assert main([*argv, "--prompt", "red", "--prompt", "blue"]) == 1
    out, err = capsys.readouterr()
    assert "good.png" in out and "Traceback" not in err
    assert f"{corrupt}: not a readable image" in err
    assert f"{text}: not a readable image" in err
    assert f"{missing}: no such file" in err


def test_a_missing_label_file(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["classify", str(tmp_path / "x.png"), "--bundle", str(tiny_bundle_dir)]
    assert main([*argv, "--labels", str(tmp_path / "nope.txt")]) == 2
    _one_line_error(capsys, "nope.txt does not exist")


def test_an_empty_label_file_says_it_is_empty(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# only a comment\n\n")
    argv = ["classify", str(tmp_path / "x.png"), "--bundle", str(tiny_bundle_dir), "--labels", str(labels)]
    assert main(argv) == 2
    _one_line_error(capsys, "is empty")


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("a photo", "must contain {} exactly once"),
        ("a {0} {x}", "must contain {}"),
        ("a {} {x}", "brace other than"),
    ],
)
def test_bad_templates(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, needle: str
) -> None:
    argv = ["classify", str(tmp_path / "x.png"), "--bundle", str(tiny_bundle_dir), "--prompt", "cat"]
    assert main([*argv, "--template", template]) == 2
    _one_line_error(capsys, needle)


def test_partition_out_under_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["partition", str(tmp_path / "model"), "--out", str(blocker / "bundle")]) == 2
    _one_line_error(capsys, "is a file, not a directory")


def test_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only SplitclipErrors are one-liners: a ValueError from a bug is not dressed up as a user error."""
    import splitclip.classify

    def broken(args: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(splitclip.classify, "run", broken)
    assert main(["classify", "x.png", "--bundle", "b", "--prompt", "a"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_command_whose_side_is_not_installed_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edge install has no cloud extra: its commands explain, whatever options were given."""
    import splitclip.cli

    monkeypatch.setattr(splitclip.cli, "commands", lambda: [(("ghost",), "no_such_side.cli")])
    assert main(["ghost", "--bundle", "x"]) == 2
    err = capsys.readouterr().err
    assert "`splitclip ghost` is unavailable here" in err and "unrecognized" not in err


def test_a_reader_that_left_is_no_traceback(
    tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`splitclip search ... | head`: the pipe closes early; exit 141 (as a shell would) and no traceback."""
    import splitclip.bundle_cli

    def run(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(splitclip.bundle_cli, "run", run)
    assert main(["bundle", "info", str(tiny_bundle_dir)]) == 141
    assert "Traceback" not in capsys.readouterr().err
