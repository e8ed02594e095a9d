"""`python -m memfit.plan SPEC`: see `memfit.plan.isolated`."""

import sys

from memfit.plan.isolated import main

main(sys.argv[1])
