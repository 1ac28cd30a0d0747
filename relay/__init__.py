"""relay: store-and-forward OCPI 2.2.1 sidecar between a CPO's CSMS and GIREVE's IOP."""

__version__ = "0.1.0"
__all__ = ["__version__"]
