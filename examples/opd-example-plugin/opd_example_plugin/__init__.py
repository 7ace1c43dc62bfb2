"""An example third-party plugin for opd_plugins: one divergence (``example_tv``) and one lifecycle hook.

Installing the distribution is enough: its entry point (group ``opd_plugins``, name ``example``) points the
plugin manager at :mod:`opd_example_plugin.hooks`. Nothing heavy is imported here.
"""

__version__ = "0.1.0"
