"""The ``sfr`` subcommands, one module each: ``add_arguments(parser)`` and ``main(args) -> int``.

Each is a thin layer over the Python API of its library module; :mod:`sfr.cli` imports a command's
module only when that command runs, so ``sfr --help`` stays fast.
"""
