"""ECHO serving: the torch-free runtime behind Triton Inference Server (PyTriton) and a report page.

Imports `runtime` only (tests/test_layer_rule.py), so an edge box installs the base package
plus the `serve` extra and no PyTorch. `echo-serve --engine-dir engines/echo` (echo_serve/cli.py).
"""
