"""`python -m lenet` (also what `torchrun -m lenet` runs)."""

import sys

from lenet.cli import main

sys.exit(main())
