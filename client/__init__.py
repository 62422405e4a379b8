"""The one D-Bus client of hypervisord, shared by the REST bridge and the console.

Layers, bottom up: `names` (the bus contract: bus name, paths, interfaces, the
automation kinds), `bus` (connecting), `errors` (D-Bus error replies as ClientError),
`objects` (the connection and its ObjectManager mirror, kept in arrival order, with
name-owner tracking and reconnects). The bridge adds HTTP on top, the console its view
of jobs; neither talks to dbus-fast about the service's objects on its own.
"""
