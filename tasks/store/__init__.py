"""The Chroma store: versioned collections behind an alias, publishing, search, and the lock
that keeps one publisher per store."""
