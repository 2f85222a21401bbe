"""``python -m nbbgtask``: the command line."""

import sys

from nbbgtask.commands.cli import main

sys.exit(main())
