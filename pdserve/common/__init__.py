"""Torch-free building blocks shared by every component: parameters, outputs, errors, configs.

Nothing in this package imports torch or any other pdserve package, so the router and the client SDK
can use it on machines without a deep-learning stack.
"""
