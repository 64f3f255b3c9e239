"""The public plugin API (``panda.plugins.api``) and panda's built-in plugins."""
