"""The `splitclip` command: finds its subcommands through entry points, so this module imports no side.

Each part registers its commands in pyproject.toml under `[project.entry-points."splitclip.commands"]`
as `"group.name" = "package.module"`; the module has `HELP`, `build_parser(p)` and `run(args)` and keeps
heavy imports (torch, ray) inside `run`, so `--help` stays fast and an edge install without torch still
runs its own commands. Entry points rather than a list here: the shared package must not name the sides
above it, and an install that lacks a side simply lacks its commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata

from splitclip.errors import SplitclipError

GROUP = "splitclip.commands"
GROUP_HELP = {
    "edge": "edge node commands",
    "bench": "benchmarks that print tables",
    "cloud": "start the cloud service, or look at it",
    "bundle": "look at a bundle",
}


def commands() -> list[tuple[tuple[str, ...], str]]:
    """(command path, module) for every registered command, in a stable order."""
    eps = metadata.entry_points(group=GROUP)
    return sorted((tuple(ep.name.split(".")), ep.value) for ep in eps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitclip",
        description="Edge-cloud split inference for CLIP-style models. Run `splitclip COMMAND --help` for details.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {(): top}
    for path, module in commands():
        try:
            mod = importlib.import_module(module)
            help_text = str(getattr(mod, "HELP", "") or (mod.__doc__ or "").strip().splitlines()[0])
        except ImportError as e:  # e.g. the cloud extra is not installed on an edge device
            mod, help_text = None, f"unavailable here: {e}"
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            if prefix in parsers and depth < len(path):
                continue
            parent = prefix[:-1]
            if parent not in subs:
                # a group that is also a command (`splitclip cloud`): its subcommands are optional
                subs[parent] = parsers[parent].add_subparsers(
                    dest=f"sub{len(parent)}", metavar="SUBCOMMAND", required=parent not in _RUNNABLE
                )
            if prefix not in parsers:
                text = help_text if depth == len(path) else GROUP_HELP.get(prefix[-1], "")
                parsers[prefix] = subs[parent].add_parser(prefix[-1], help=text, description=text)
        p = parsers[path]
        _RUNNABLE.add(path)
        if mod is None:
            p.set_defaults(_unavailable=f"`splitclip {' '.join(path)}` is {help_text}")
            p.add_argument(
                "_ignored", nargs=argparse.REMAINDER, help=argparse.SUPPRESS
            )  # say why, not "unrecognized"
            continue
        p.set_defaults(_module=module, _unavailable=None)
        mod.build_parser(p)
    return parser


_RUNNABLE: set[tuple[str, ...]] = set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "_unavailable", None):  # its options are unknown here: say why, not "unrecognized"
        print(args._unavailable, file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_module", None):
        parser.print_help(sys.stderr)
        return 2
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `splitclip search ... | head`: the reader left, nothing is wrong
        # stdout is gone: point it at devnull so that the interpreter's final flush does not fail too
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation is a ValueError
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except SplitclipError as e:  # an expected user error: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug: keep the traceback
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
