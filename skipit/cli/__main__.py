"""``python -m skipit.cli``."""

import sys

from skipit.cli import main

sys.exit(main())
