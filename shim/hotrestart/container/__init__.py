"""Containers and their processes: state machine, stdio, exits."""
