"""``python -m rampup``: the command line, as torchrun starts it (``torchrun ... -m rampup train CONFIG``)."""

import sys

from rampup.cli import main

sys.exit(main())
