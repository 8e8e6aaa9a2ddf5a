"""The command line: parses arguments, runs a session or a subcommand, and prints.

The only package that prints. `arguments` builds the parsers, `build` runs `mbuild
[TARGETS]` (through `mbuild.session`), `commands` the subcommands, `console` draws
progress and tables, and `shared` holds what they all need (loading the Mergefile and
the cache, the session request).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from mbuild.cli import arguments, build, commands, console
from mbuild.errors import MbuildError
from mbuild.launcher import SUBCOMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbuild`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return commands.subcommand(argv)
        return build.build(arguments.build_parser().parse_args(argv))
    except MbuildError as error:
        print(f"mbuild: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbuild: interrupted; earlier outputs are intact", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mbuild methods | head`): nothing more can reach it, and
        # Python must not try again to flush into the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        # After any error message: no import may still be running at exit.
        console.SideImport.join_all()
