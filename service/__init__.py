"""hypervisord: the hypersdk system service."""

__version__ = "1.0.0"
