"""The console's screens: VMs, Migrate, Jobs, one job, automation objects, help."""
