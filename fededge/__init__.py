"""fededge: federated learning for fleets of edge devices over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fededge")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
