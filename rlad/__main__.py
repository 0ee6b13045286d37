"""``python -m rlad ...`` (and ``torchrun -m rlad ...``): the ``rlad`` command."""

import sys

from .cli import main

sys.exit(main())
