"""Command-line interface: one module per command group; each only parses, calls, prints."""
