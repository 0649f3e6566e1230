"""diffbench's built-in plugins (installed as the package ``diffbench_plugins``).

Each module is registered through the ``diffbench`` entry-point group in pyproject.toml:
exactly the path a third-party plugin takes.
"""
