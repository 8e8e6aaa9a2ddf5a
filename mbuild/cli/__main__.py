"""`python -m mbuild.cli`: the command line, started as `mbuild` is."""

from mbuild import launcher
from mbuild.cli import main

launcher.run(main)
