"""`python -m fmct.cli`: the same as the `fmct` command."""
import sys

from fmct.cli import main

sys.exit(main())
