"""The argument parsers: the build's, and the options every subcommand shares."""

from __future__ import annotations

import argparse

from mbuild.launcher import SUBCOMMANDS


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", default="Mergefile", help="the Mergefile (default: ./Mergefile)")
    parser.add_argument("--cache-dir", help="cache folder (default: cache/ beside the Mergefile, or $MBUILD_CACHE)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only=True)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mbuild [TARGETS|all] ...``."""
    parser = argparse.ArgumentParser(
        prog="mbuild",
        description="Make for model merging. Subcommands: " + ", ".join(SUBCOMMANDS) + ".",
    )
    parser.add_argument("targets", nargs="*", help="targets to bring up to date (default: all)")
    common(parser)
    parser.add_argument("-n", "--dry-run", action="store_true", help="show the plan and why; read no tensor")
    parser.add_argument("--force", action="store_true", help="rebuild the selected targets even if fresh")
    parser.add_argument("-j", "--jobs", type=job_count, default=2, help="tensor tasks run at once (default 2)")
    parser.add_argument("--device", default="cpu", help="where the math runs: cpu (default) or cuda")
    parser.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="where tensor tasks run: threads here (default) or a Ray cluster (results through --cache-dir)",
    )
    parser.add_argument(
        "--ray-address", help="the Ray cluster (HOST:PORT or auto; default: auto, else a Ray of this run's own)"
    )
    parser.add_argument("-k", "--keep-going", action="store_true", help="build what does not depend on a failed target")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
    parser.add_argument("--shard-size", default="5G", type=byte_count, help="largest output shard (default 5G)")
    parser.add_argument(
        "--cache-size", type=byte_count, help="bound of the tensor cache (default: half the free disk where it lives)"
    )
    return parser


def job_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("-j must be at least 1")
    return count


def byte_count(text: str) -> int:
    units = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        count = float(value[: len(value) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500M or 5G)") from None
    if count <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return int(count)
