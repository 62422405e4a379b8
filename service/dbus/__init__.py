"""D-Bus skin of hypervisord: objects, introspection XML, polkit checks."""
