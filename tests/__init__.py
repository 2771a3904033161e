"""The test suite. A regular package (this file) so that `tests.*` is always this folder:
torch-fidelity installs a top-level `tests` package into site-packages, which would otherwise
shadow a namespace package of the same name."""
