"""Subcommands of ``python -m kernelattn``: one module each, imported only when run.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.
"""

#: command name -> module under kernelattn.commands
COMMANDS = {
    "demo": "demo",
    "compare": "compare",
    "bench": "bench",
    "listops": "listops",
}
DEFAULT = "demo"
