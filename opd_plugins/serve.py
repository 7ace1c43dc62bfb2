"""Deprecated: the scoring server is :mod:`opd_plugins.commands.serve_teacher` and the client side that spawns one
is :mod:`opd_plugins.teachers._local_server`. This module re-exports both for one release."""

import warnings

from opd_plugins.commands.serve_teacher import (  # noqa: F401
    HELP_EPILOG,
    VLLM_EQUIVALENT,
    Batcher,
    Scorer,
    ServerConfig,
    add_arguments,
    make_server,
    parse_completion_request,
    run,
)
from opd_plugins.teachers._local_server import (  # noqa: F401
    SpawnedServer,
    acquire_local_server,
    release_local_server,
    spawn_server,
    wait_for_health,
)

warnings.warn("opd_plugins.serve moved to opd_plugins.commands.serve_teacher (the server) and "
              "opd_plugins.teachers._local_server (spawning one); this module goes away in the next release",
              DeprecationWarning, stacklevel=2)
