"""Building model bundles: TensorFlow graphs converted to LiteRT, at build time only.

Nothing here runs on a device, and nothing here imports TensorFlow at import time:
:mod:`fededge.build.builder` imports it when a graph is built (the ``convert`` extra), and
:mod:`fededge.build.reference` is the numpy MLP the tests check the built graph against.
"""
