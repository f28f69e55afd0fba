"""The subcommands of the ``lrpkit`` command line, one module each.

Each module defines ``add_parser(subparsers)``, which adds its subcommand and sets ``func`` to the function that
runs it (``func(args) -> int``, the exit status).
"""
