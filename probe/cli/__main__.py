"""`python -m probe.cli`."""

from probe.cli.commands import main

main()
