"""`python -m hublab`: the same as the `hublab` command."""
import sys

from hublab.cli import main

if __name__ == "__main__":
    sys.exit(main())
