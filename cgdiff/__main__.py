"""`python -m cgdiff ...` runs the `cgdiff` command."""

import sys

from .cli import main

sys.exit(main())
