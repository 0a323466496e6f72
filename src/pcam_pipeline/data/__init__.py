"""Dataset formats, sources and loaders."""
