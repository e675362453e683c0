"""``python -m streamcast.cli``: the ``streamcast`` command."""

import sys

from streamcast.cli import main

sys.exit(main())
