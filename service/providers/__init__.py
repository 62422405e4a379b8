"""Sources of VMs, one module each."""
