"""``python -m opd_plugins`` (and ``accelerate launch -m opd_plugins train RECIPE``)."""

import sys

from opd_plugins.cli import main

sys.exit(main())
