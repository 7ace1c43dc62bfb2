"""Deprecated: ``precompute-teacher`` is :mod:`opd_plugins.commands.precompute_teacher`, and the cache writer is
:mod:`opd_plugins.teachers.cache.writer`. This module re-exports both for one release."""

import warnings

from opd_plugins.commands.precompute_teacher import add_arguments, precompute_teacher, run  # noqa: F401
from opd_plugins.teachers.cache.format import FORMAT, MANIFEST  # noqa: F401
from opd_plugins.teachers.cache.writer import (  # noqa: F401
    TOPK_DTYPES,
    cache_teacher_batch,
    tokenize_rollouts,
    weights_sha256,
    write_cache,
)

warnings.warn("opd_plugins.precompute moved to opd_plugins.commands.precompute_teacher and "
              "opd_plugins.teachers.cache.writer; this module goes away in the next release",
              DeprecationWarning, stacklevel=2)
