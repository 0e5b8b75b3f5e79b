"""Multi-host scenarios in Linux network namespaces (root only; skipped elsewhere)."""
