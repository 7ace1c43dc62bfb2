"""``python -m opd_plugins`` (and ``accelerate launch -m opd_plugins train RECIPE``).

``python -m`` puts the current directory first on ``sys.path``; the ``opd-plugins`` script does not. It is taken
off again here, so that both import a recipe's ``plugins:`` modules from the same places (the installed packages
and ``PYTHONPATH``; run ``PYTHONPATH=. opd-plugins ...`` for a module in the current directory).
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)

from opd_plugins.cli import main  # noqa: E402

sys.exit(main())
