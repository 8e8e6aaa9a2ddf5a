"""`python -m mbuild` and the `mbuild` console script (see `mbuild.launcher`)."""

from mbuild import launcher


def entry() -> None:
    """Run the command line."""
    launcher.run(_main)


def _main(argv: list[str]) -> int:
    from mbuild.cli import main

    return main(argv)


if __name__ == "__main__":
    entry()
