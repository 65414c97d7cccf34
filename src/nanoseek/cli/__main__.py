"""`python -m nanoseek.cli COMMAND`: the same as the `nanoseek` console script."""

import sys

from nanoseek.cli import main

sys.exit(main())
