"""Every external command the shim runs, each built in one place."""
