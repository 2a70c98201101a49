"""`python -m grouprl ...` is the `grouprl` command (compare starts its runs this way)."""

from grouprl.cli import main

if __name__ == "__main__":  # not when a process pool's worker imports it
    main()
