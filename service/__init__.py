"""hypervisord: the hypersdk system service."""
