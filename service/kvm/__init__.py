"""The KVM end: guest conversion, the guest CPU, the libvirt domain, defining it and
proving it boots. Uses the disk libraries and the model; knows nothing of providers."""
