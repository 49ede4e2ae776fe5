"""`maskrcnn` command line. Each subcommand lives in maskrcnn/commands/<name>.py and provides
`NAME`, `HELP`, `ORDER`, `add_arguments(parser)` and `run(args) -> int` (the exit status)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys

from . import commands
from .errors import MaskRCNNError


class _Parser(argparse.ArgumentParser):
    """Bad command lines get one line, like every other user error: `maskrcnn CMD: error: ...`, exit 2.

    A flag whose value breaks its rule (maskrcnn.checks) reads `--lr must be a finite number > 0, got nan`
    rather than argparse's `argument --lr: ...` after a usage block; `--help` still shows the usage."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): (?=must be )", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _command_modules():
    modules = [importlib.import_module(f"{commands.__name__}.{info.name}")
               for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")]
    return sorted(modules, key=lambda m: m.ORDER)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="maskrcnn", description="Instance segmentation with Mask R-CNN.")
    parser.add_argument("--version", action="version", version=f"maskrcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad command line (2, its line already printed)
        return int(done.code or 0)
    try:
        return int(args.run(args) or 0)
    except MaskRCNNError as e:
        print(f"maskrcnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"maskrcnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
