"""editserve: serve a causal LM over gRPC and edit what it knows while it serves."""

__version__ = "0.1.0"
