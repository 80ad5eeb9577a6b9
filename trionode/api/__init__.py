"""HTTP API: admin REST, JSON-RPC, WebSocket, metrics."""
