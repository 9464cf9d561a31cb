"""``python -m truffula.cli``: the ``truffula`` command."""

import sys

from truffula.cli import main

sys.exit(main())
