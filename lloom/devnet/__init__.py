"""A whole lloom network on one machine: ``lloom devnet``."""
