"""``python -m proxy``: the same as the ``mdcloud-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
