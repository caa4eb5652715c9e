"""`python -m memenc` runs the command line."""

from memenc.cli.app import main

main()
