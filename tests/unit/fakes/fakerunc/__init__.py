"""The fake runc's modules, imported by runc_program.py: standard library only, as it runs with `python -S`."""
