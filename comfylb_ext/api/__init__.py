"""HTTP handlers, written once and mounted by either host."""
