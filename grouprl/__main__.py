"""`python -m grouprl ...` is the `grouprl` command (compare starts its runs this way)."""

from grouprl.cli import main

main()
