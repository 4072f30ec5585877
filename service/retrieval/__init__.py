"""Retrieval path: descriptor encoder, faiss index with stable ids, and the store that ties them together."""

from service.retrieval.encoder import DescriptorEncoder, embedded_encoder_path
from service.retrieval.index import DescriptorIndex, IndexSnapshot
from service.retrieval.store import Entry, RetrievalStore, StoreSnapshot, faiss_id

__all__ = [
    "DescriptorEncoder",
    "DescriptorIndex",
    "Entry",
    "IndexSnapshot",
    "RetrievalStore",
    "StoreSnapshot",
    "embedded_encoder_path",
    "faiss_id",
]
