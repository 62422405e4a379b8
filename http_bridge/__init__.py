"""hypersdk-bridge: the REST + WebSocket API, a D-Bus client."""
