"""`python -m autobatch ...`: the same as the `autobatch` console script."""
import sys

from autobatch.cli import main

sys.exit(main())
