"""Example panda plugins, registered through entry points (see pyproject.toml).

Nothing is imported here on purpose: panda lists plugins from package metadata
and imports ``panda_plugin_example.<module>`` only when a recipe names it.
"""

__version__ = "0.1.0"
