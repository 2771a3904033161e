"""Pure PyTorch library of generator families, layers, samplers and metrics.

Imports only torch, numpy and the standard library: no orchestration or reporting
packages (a test checks this).
"""
