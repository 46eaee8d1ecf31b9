"""``python -m fxkfac``."""

import sys

from fxkfac.cli import main

sys.exit(main())
