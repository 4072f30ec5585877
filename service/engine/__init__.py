"""The generation engine: one queue, continuous batching with per-sequence KV caches, streaming.

Imports torch and transformers, never grpc.
"""

from service.engine.batch import ScoreOutput
from service.engine.loader import LoadedModel, load_model, tiny_random_llama
from service.engine.sampling import SamplingParams
from service.engine.scheduler import Engine
from service.engine.sequence import EngineError, EngineRequest, TokenEvent, TokenStream

__all__ = [
    "Engine",
    "EngineError",
    "EngineRequest",
    "LoadedModel",
    "SamplingParams",
    "ScoreOutput",
    "TokenEvent",
    "TokenStream",
    "load_model",
    "tiny_random_llama",
]
