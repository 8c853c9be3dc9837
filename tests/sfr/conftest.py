"""Test setup of the ``sfr`` package's tests.

Pytest (import mode ``prepend``) puts the folder of each ``conftest.py`` on ``sys.path``: this file makes
the shared helpers of this folder (``tiny_models.py``) importable from the tests of its subfolders too
(``tests/sfr/commands/``), whichever test runs first.
"""
