"""Test doubles for the proxy's side effects (`fakes.py`), for embedders' tests and ours."""
