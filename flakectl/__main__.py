"""`python -m flakectl`: the flakectl command."""

import sys

from flakectl.cli import main

sys.exit(main())
