"""`python -m dlrun ...` is the same as the `dlrun` console script."""

from dlrun.cli import main

main()
