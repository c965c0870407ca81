"""ttrpc: containerd's lightweight RPC over Unix sockets (framing, server, client)."""
