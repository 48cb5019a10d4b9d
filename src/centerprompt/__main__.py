"""``python -m centerprompt``: the command line, as the ``centerprompt`` script runs it."""

import sys

from centerprompt.cli import main

sys.exit(main())
