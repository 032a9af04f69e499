"""Helpers the tests share (on sys.path through pytest's `pythonpath = ["tests"]`): `from support import ...`."""
