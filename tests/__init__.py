"""The test suite, a package so that each layer's modules and conftest.py have unique names
(tests.format, tests.kernels, tests.serving, tests.bench) and import shared helpers explicitly."""
