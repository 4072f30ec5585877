"""Request routing for the retrieval path: scope detection and the edit prompt template."""
