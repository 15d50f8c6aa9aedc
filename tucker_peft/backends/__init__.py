"""Framework bindings. Each submodule imports its framework; this package imports none."""
