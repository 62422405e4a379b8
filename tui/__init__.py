"""hyperctl: the Textual console and scripting CLI, a D-Bus client."""
