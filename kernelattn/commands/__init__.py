"""Subcommands of ``python -m kernelattn``: one module each, imported only when run.

A command module defines ``HELP`` (one line), ``DESCRIPTION`` (plain text for
``--help``), ``EXAMPLES`` (command lines shown under it), ``add_arguments(parser)``
and ``run(args) -> int``. ``run`` raises ``commands._args.UsageError`` for a bad
value found after parsing; the command line reports it as argparse does (exit status 2).
"""

#: command name -> module under kernelattn.commands
COMMANDS = {
    "demo": "demo",
    "compare": "compare",
    "bench": "bench",
    "listops": "listops",
    "linearize": "linearize",
}
DEFAULT = "demo"
