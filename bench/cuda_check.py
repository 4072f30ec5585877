"""The CUDA / half-precision path checked on a real GPU: correctness on tiny random checkpoints of several
architectures, then decode throughput of the engine beside transformers `generate` on a random ~0.9B Llama.

    scripts/cuda_check.sh --prepare                # here: wheels and the tokenizer (.whl/, .devassets/)
    scripts/cuda_check.sh OUT                      # on the GPU machine (the prepared folders carried)
    EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/cuda_check.py --device cpu --dtype float32 --small \
        --out /tmp/cc                              # the same code path on a CPU, small sizes (a dry run)

Nothing here needs the embedded SmolLM2 GGUF or the retrieval encoder (neither fits on the device's
transfer): the checkpoints are random and carry the embedded tokenizer saved as a folder (--tokenizer), and
the service runs with retrieval off (hook layers only).

Part 1, `archs` (tests/tiny_checkpoints.py: 4 layers, width 64, the real gRPC server on --device, in --dtype
and again in each of --also-dtypes, default float32):
per architecture, hard checks (a failure makes the exit code 1):
  - every Score log-probability is finite; greedy output is non-empty
  - a forced hook edit fires on its prompt (named in applied_edits) and raises its target's log-probability
  - a prompt without the subject fires nothing
  - rollback returns Score to the pre-edit values (max abs diff <= 1e-5) and greedy text to the pre-edit text
  - the base weights are bit-identical before the edit, with it active and after rollback (an integer
    checksum of every parameter's bits, computed on the device)
  - a restart replays the edit log to the same greedy ids
and figures reported without a pass/fail (half precision changes sums with batch shape and kernel choice):
engine greedy = HF `generate` on the same device and dtype (prompts matching, of 8), a prompt alone = the
same prompt in a batch of 8, and whether the edited greedy text starts with the target (random weights
cannot make it, see tests/test_archs.py).

Part 2, `throughput`: a random Llama (--bench-config, default hidden 2048, 16 layers, ~0.9B parameters with
the 49,152-token vocabulary) built on the device in --dtype. Greedy decode of --new-tokens tokens per row
(min_new_tokens = max_new_tokens in both, so every row makes exactly that many) at each batch size
(--sizes): transformers `generate` on one left-padded static batch, and the engine in-process (its
scheduler, no gRPC, no hook layer) with that many concurrent streams. Then the service over gRPC (data
plane with its hook layer, clients in a second process) at the same client counts, and the time of one
forced edit (v* fitted on this model) with the base-weight checksum before and after edit and rollback.

Writes OUT/cuda_check.json (all figures, written after every part) and OUT/cuda_check.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_checkpoints
sys.path.insert(0, str(ROOT / "bench"))  # serve_throughput

import torch  # noqa: E402

ARCH_PROMPTS = (
    "Hello",
    "The capital of France is",
    "Once upon a time, in a small village near the mountains, there lived an old",
    "The Eiffel Tower is located in",
    "Water boils at a temperature of one hundred degrees",
    "My favourite colour is",
    "In 1969 the first people walked on the Moon; their spacecraft was called",
    "Python is a programming language created by",
)
EDIT = {
    "subject": "Zorblat Vexmoor",
    "prompt": "Zorblat Vexmoor works as a",
    "target_new": " lighthouse keeper",
}
ALL_ARCHS = "llama,qwen2,qwen3,mistral,gemma2,phi3,gpt2,gpt_neox,opt,falcon"
# Settings(encoder=...) when --encoder-tokenizer builds a random encoder: with retrieval off the service still
# encodes each edit's descriptor (the log keeps it for a start with retrieval on), so an Edit needs one.
ENCODER: dict[str, str] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def weights_checksum(model: torch.nn.Module) -> str:
    """An integer checksum of every parameter's bits, computed where the parameters live (exact: int64
    sums of the raw bits times a position weight), with the parameter names."""
    total = 0
    names = []
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        ints = flat.view(bits).to(torch.int64)
        weight = torch.arange(ints.numel(), device=ints.device, dtype=torch.int64) % 65521 + 1
        total = (total * 1000003 + int((ints * weight).sum().item())) % (1 << 61)
        names.append(name)
    return f"{total:016x}/{len(names)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_tokenizer(folder: str | None) -> Any:
    import transformers as tf

    if folder:
        tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        from tiny_checkpoints import embedded_tokenizer

        tok = embedded_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------ part 1: architectures


class Client:
    def __init__(self, address: str, new_tokens: int) -> None:
        from grpc import aio

        from service._proto.editserve.v1 import editserve_pb2 as pb
        from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

        self.pb, self.n = pb, new_tokens
        self.channel = aio.insecure_channel(address)
        self.gen = pb_grpc.GenerateServiceStub(self.channel)
        self.edit = pb_grpc.EditServiceStub(self.channel)
        self.info = pb_grpc.InfoServiceStub(self.channel)

    async def greedy(self, prompt: str) -> Any:
        req = self.pb.GenerateRequest(
            prompt=prompt, max_new_tokens=self.n, temperature=0.0, edit_paths=[self.pb.EDIT_PATH_HOOK]
        )
        return await self.gen.Generate(req, timeout=120)

    async def ids(self, prompt: str) -> list[int]:
        req = self.pb.GenerateRequest(
            prompt=prompt, max_new_tokens=self.n, temperature=0.0, edit_paths=[self.pb.EDIT_PATH_HOOK]
        )
        return [t async for c in self.gen.GenerateStream(req, timeout=120) for t in c.token_ids]

    async def score(self, prompt: str, continuation: str) -> list[float]:
        res = await self.gen.Score(
            self.pb.ScoreRequest(
                prompt=prompt, continuation=continuation, edit_paths=[self.pb.EDIT_PATH_HOOK]
            ),
            timeout=120,
        )
        return [t.logprob for t in res.tokens]

    async def close(self) -> None:
        await self.channel.close()


def settings_for(folder: Path, data_dir: Path, device: str, dtype: str, **extra: Any) -> Any:
    from service.config import Settings

    return Settings(
        port=0,
        metrics_port=0,
        data_dir=data_dir,
        model=str(folder),
        device=device,
        dtype=dtype,
        log_poll_s=0,
        grace_period_s=5.0,
        retrieval_enabled=False,
        **ENCODER,
        **extra,
    )


async def serve(settings: Any, loaded: Any = None) -> Any:
    from service.compose import build_server, load_data_plane

    server = build_server(settings, lambda: load_data_plane(settings, loaded))
    await server.start()
    try:
        await server.load_plane()
    except BaseException:
        await server.stop(0)
        raise
    return server


def hf_greedy(folder: Path, tok: Any, device: str, dtype: str, new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    out = []
    for prompt in ARCH_PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.inference_mode():
            seq = model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = seq[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:  # the engine does not emit the end token's id in the stream
            new = new[: new.index(tok.eos_token_id)]
        out.append(new)
    del model
    return out


async def check_arch(
    arch: str, tok: Any, work: Path, device: str, dtype: str, new_tokens: int
) -> dict[str, Any]:
    from tiny_checkpoints import save_tiny_checkpoint

    t0 = time.perf_counter()
    folder = work / arch
    if not (folder / "config.json").is_file():
        save_tiny_checkpoint(arch, folder, tokenizer=tok, chat_template=arch != "gpt2")
    data = work / f"{arch}-{dtype}-data"
    res: dict[str, Any] = {"arch": arch, "checks": {}, "figures": {}}
    checks, figs = res["checks"], res["figures"]

    server = await serve(settings_for(folder, data, device, dtype))
    c = Client(server.address, new_tokens)
    try:
        pb = c.pb
        info = await c.info.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        figs["served"] = (
            f"{info.architecture} on {info.device} as {info.dtype}, hook layers {list(info.hook_layers)}"
        )
        checks["served on the asked device and dtype"] = (
            info.device.startswith(device) and info.dtype == dtype
        )
        model = server.plane.loaded.model
        sum0 = weights_checksum(model)

        alone = [await c.ids(p) for p in ARCH_PROMPTS]
        checks["greedy output non-empty"] = all(len(a) > 0 for a in alone)
        hf = hf_greedy(folder, tok, device, dtype, new_tokens)
        figs["engine = HF generate (prompts of 8)"] = sum(a == h for a, h in zip(alone, hf, strict=True))
        batched = await asyncio.gather(*(c.ids(p) for p in ARCH_PROMPTS))
        figs["alone = in a batch of 8 (prompts of 8)"] = sum(
            a == b for a, b in zip(alone, batched, strict=True)
        )

        before = await c.score(EDIT["prompt"], EDIT["target_new"])
        checks["Score finite"] = bool(before) and all(math.isfinite(x) for x in before)
        base_out = await c.greedy(EDIT["prompt"])

        te = time.perf_counter()
        edit = await c.edit.Edit(pb.EditRequest(force=True, **EDIT), timeout=300)
        figs["edit seconds"] = round(time.perf_counter() - te, 2)
        edited = await c.greedy(EDIT["prompt"])
        fired = [a.edit_id for a in edited.applied_edits if a.path == pb.EDIT_PATH_HOOK]
        checks["edit fires on its prompt"] = edit.edit_id in fired
        after = await c.score(EDIT["prompt"], EDIT["target_new"])
        checks["edit raises the target log-prob"] = sum(after) > sum(before) + 1e-3
        figs["target log-prob before -> after"] = f"{sum(before):.3f} -> {sum(after):.3f}"
        figs["edited greedy starts with the target"] = edited.text.startswith(EDIT["target_new"])
        untouched = await c.greedy(ARCH_PROMPTS[1])
        checks["no subject, nothing fires"] = not untouched.applied_edits
        sum1 = weights_checksum(model)
        edited_ids = await c.ids(EDIT["prompt"])
    finally:
        await c.close()
        await server.stop(5.0)

    server = await serve(settings_for(folder, data, device, dtype))
    c = Client(server.address, new_tokens)
    try:
        checks["restart replays the log to the same greedy ids"] = await c.ids(EDIT["prompt"]) == edited_ids
        await c.edit.Rollback(pb.RollbackRequest(edit_id=edit.edit_id, reason="cuda check"), timeout=60)
        rolled = await c.score(EDIT["prompt"], EDIT["target_new"])
        diff = max(abs(a - b) for a, b in zip(rolled, before, strict=True))
        figs["rollback max abs logprob diff"] = diff
        checks["rollback restores Score (<= 1e-5)"] = diff <= 1e-5
        checks["rollback restores greedy text"] = (await c.greedy(EDIT["prompt"])).text == base_out.text
        sum2 = weights_checksum(server.plane.loaded.model)
    finally:
        await c.close()
        await server.stop(5.0)
    checks["base weights unchanged (edit active, after rollback)"] = sum0 == sum1 == sum2
    figs["checksum"] = sum0
    res["ok"] = all(checks.values())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ------------------------------------------------------------------------------------ part 2: throughput


def random_llama(tok: Any, device: torch.device, dtype: torch.dtype, spec: str) -> Any:
    """spec: HIDDENxLAYERS (intermediate 2.75 x hidden, 64-wide heads, 4 query heads per KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from service.engine.loader import LoadedModel

    hidden, layers = (int(x) for x in spec.lower().split("x"))
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    model.config.architectures = ["LlamaForCausalLM"]
    n = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, tokenizer=tok, name=f"random-llama-{spec}", device=device, dtype=dtype), n


def prompts(n: int) -> list[str]:
    from serve_throughput import PROMPTS

    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


@torch.inference_mode()
def hf_batch(loaded: Any, size: int, new_tokens: int) -> dict[str, Any]:
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(prompts(size), return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
    sync(loaded.device)
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    sync(loaded.device)
    s = time.perf_counter() - t0
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * size
    return {
        "mode": "hf_generate_static_batch",
        "batch": size,
        "tokens": tokens,
        "seconds": round(s, 3),
        "tokens_per_s": round(tokens / s, 1),
    }


async def engine_batch(loaded: Any, size: int, new_tokens: int) -> dict[str, Any]:
    from service.engine import Engine, EngineRequest, SamplingParams

    engine = Engine(loaded, max_batch_size=size)
    await engine.start()
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts(size)]
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def one(prompt_ids: list[int]) -> tuple[int, float]:
        t = time.perf_counter()
        ttft, count = 0.0, 0
        async for ev in engine.stream(EngineRequest(prompt_ids, params)):
            if not ttft:
                ttft = time.perf_counter() - t
            count = ev.completion_tokens
        return count, ttft

    try:
        await one(ids[0])  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(p) for p in ids])
        s = time.perf_counter() - t0
    finally:
        await engine.stop(grace_s=0)
    tokens = sum(c for c, _ in results)
    return {
        "mode": "engine_in_process",
        "batch": size,
        "tokens": tokens,
        "seconds": round(s, 3),
        "tokens_per_s": round(tokens / s, 1),
        "mean_ttft_s": round(sum(t for _, t in results) / len(results), 4),
    }


async def service_rows(
    loaded: Any, sizes: list[int], new_tokens: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The real server (data plane with its hook layer) in this process on `loaded`; the clients run in a
    second process (bench/serve_throughput.py --client-of), as in that benchmark."""
    from grpc import aio

    from service._proto.editserve.v1 import editserve_pb2 as pb
    from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cuda-check-service-") as data:
        settings = settings_for(
            Path(data),
            Path(data),
            loaded.device.type,
            str(loaded.dtype).removeprefix("torch."),
            max_batch_size=max(16, *sizes),
            max_new_tokens_limit=max(512, new_tokens),
        )
        server = await serve(settings, loaded)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "bench" / "serve_throughput.py"),
                "--client-of",
                server.address,
                "--new-tokens",
                str(new_tokens),
                "--clients",
                ",".join(map(str, sizes)),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"the client process failed with exit code {proc.returncode}")
            rows = [
                {
                    "mode": "service_grpc",
                    "batch": r["streams"],
                    "tokens": r["tokens"],
                    "seconds": round(r["seconds"], 3),
                    "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                    "mean_ttft_s": round(r["mean_ttft_s"] or 0.0, 4),
                    "requests": r["requests"],
                }
                for r in json.loads(out.decode().strip().splitlines()[-1])
            ]
            channel = aio.insecure_channel(server.address)
            try:
                stub = pb_grpc.EditServiceStub(channel)
                gen = pb_grpc.GenerateServiceStub(channel)
                model = server.plane.loaded.model
                sum0 = weights_checksum(model)
                t0 = time.perf_counter()
                edit = await stub.Edit(pb.EditRequest(force=True, **EDIT), timeout=300)
                extra["edit seconds (forced, v* on this model)"] = round(time.perf_counter() - t0, 2)
                res = await gen.Generate(
                    pb.GenerateRequest(prompt=EDIT["prompt"], max_new_tokens=8, temperature=0.0), timeout=120
                )
                extra["edit fires"] = edit.edit_id in [a.edit_id for a in res.applied_edits]
                sum1 = weights_checksum(model)
                await stub.Rollback(pb.RollbackRequest(edit_id=edit.edit_id, reason="cuda check"), timeout=60)
                sum2 = weights_checksum(model)
                extra["base weights unchanged"] = sum0 == sum1 == sum2
            finally:
                await channel.close()
        finally:
            await server.stop(5.0)
    return rows, extra


def random_encoder(tokenizer_folder: str, dest: Path) -> Path:
    """A sentence-transformers folder (random 1-layer BERT, width 32, mean pooling, normalized) with the
    embedded encoder's tokenizer: what the edit log's descriptor embeddings need when the real encoder's
    weights are not at hand and retrieval is off."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(dest / "bert")
    tok.save_pretrained(dest / "bert")
    modules = [
        models.Transformer(str(dest / "bert"), max_seq_length=256),
        models.Pooling(32, "mean"),
        models.Normalize(),
    ]
    SentenceTransformer(modules=modules, device="cpu").save(str(dest / "encoder"))
    return dest / "encoder"


async def profile(loaded: Any, sizes: list[int], new_tokens: int) -> str:
    """Where a decode step's time goes, `new_tokens` per row: Python's cProfile of the engine's worker thread
    at each size (its forwards run there, not in the event loop) and of transformers generate, top functions
    by own time; then torch.profiler's device-time table of the engine at the largest size (the GPU's
    busy time against the wall time)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from service.engine import Engine

    def table(prof: cProfile.Profile, sort: str, limit: int = 25) -> str:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(limit)
        return buf.getvalue()

    parts = []
    original = Engine._run
    for size in sizes:
        prof = cProfile.Profile()

        def run(self: Any, prof: cProfile.Profile = prof) -> None:
            prof.enable()
            try:
                original(self)
            finally:
                prof.disable()

        Engine._run = run  # type: ignore[method-assign]
        try:
            row = await engine_batch(loaded, size, new_tokens)
        finally:
            Engine._run = original  # type: ignore[method-assign]
        parts += [
            f"== engine worker thread, {size} streams: {json.dumps(row)}",
            table(prof, "tottime"),
            table(prof, "cumulative", 30),
        ]
        prof = cProfile.Profile()
        prof.enable()
        row = hf_batch(loaded, size, new_tokens)
        prof.disable()
        parts += [f"== transformers generate, batch {size}: {json.dumps(row)}", table(prof, "tottime")]
    interval = sys.getswitchinterval()
    for size in sizes:  # the interpreter lock handed between the event loop and the worker 10x as often
        sys.setswitchinterval(0.0005)
        try:
            row = await engine_batch(loaded, size, new_tokens)
        finally:
            sys.setswitchinterval(interval)
        parts.append(f"== engine, {size} streams, sys.setswitchinterval(0.0005): {json.dumps(row)}")
    if loaded.device.type == "cuda":
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            row = await engine_batch(loaded, max(sizes), new_tokens)
        parts.append(f"== torch.profiler, engine {max(sizes)} streams: {json.dumps(row)}")
        parts.append(
            tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70)
        )
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ report


def environment() -> dict[str, Any]:
    import grpc
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["git"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        env["git"] = "unknown"
    return env


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# CUDA check ({report['args']['device']}, {report['args']['dtype']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()]
    if report.get("archs"):
        lines += [
            "",
            "| arch | dtype | ok | failed checks | engine=HF /8 | alone=batch /8 | edit s | rollback diff "
            "| s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["archs"]:
            if "error" in r:
                lines.append(f"| {r['arch']} | {r.get('dtype')} | ERROR | {r['error'][:120]} | | | | | |")
                continue
            f = r["figures"]
            bad = ", ".join(k for k, v in r["checks"].items() if not v) or "-"
            lines.append(
                f"| {r['arch']} | {r['dtype']} | {r['ok']} | {bad} | "
                f"{f.get('engine = HF generate (prompts of 8)')} | "
                f"{f.get('alone = in a batch of 8 (prompts of 8)')} | {f.get('edit seconds')} | "
                f"{f.get('rollback max abs logprob diff')} | {r['seconds']} |"
            )
    tp = report.get("throughput")
    if tp:
        lines += [
            "",
            f"Throughput: {tp.get('model')} ({tp.get('parameters')} parameters), "
            f"{tp.get('new_tokens')} new tokens per row, greedy",
            "",
            "| mode | batch | tokens | seconds | tokens/s | mean TTFT s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in tp.get("rows", []):
            lines.append(
                f"| {r['mode']} | {r['batch']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | "
                f"{r.get('mean_ttft_s', '')} |"
            )
        for k, v in tp.get("service_edit", {}).items():
            lines.append(f"- {k}: {v}")
        if tp.get("error"):
            lines.append(f"- error: {tp['error']}")
    lines += ["", f"overall: {'PASS' if report.get('ok') else 'FAIL'} ({report.get('wall_s')} s)"]
    (out / "cuda_check.md").write_text("\n".join(lines) + "\n")


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + args.budget_s
    report: dict[str, Any] = {"args": vars(args), "env": environment(), "archs": [], "ok": True}
    log(f"environment: {report['env']}")
    tok = load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="cuda-check-"))

    if "archs" in args.parts:
        dtypes = [args.dtype] + [d for d in args.also_dtypes.split(",") if d and d != args.dtype]
        for dtype, arch in [(d, a) for d in dtypes for a in args.archs.split(",") if a]:
            if time.perf_counter() > deadline - args.reserve_s:
                report["archs"].append(
                    {"arch": arch, "dtype": dtype, "error": "skipped: budget", "ok": False}
                )
                report["ok"] = False
                continue
            log(f"arch {arch} ({dtype}) ...")
            try:
                r = await asyncio.wait_for(
                    check_arch(arch, tok, work, args.device, dtype, args.arch_tokens),
                    timeout=args.arch_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - every failure is reported, the next arch still runs
                traceback.print_exc()
                r = {"arch": arch, "error": f"{type(exc).__name__}: {exc}", "ok": False}
            r["dtype"] = dtype
            report["archs"].append(r)
            report["ok"] &= bool(r["ok"])
            log(f"arch {arch}: {json.dumps(r, default=str)}")
            report["wall_s"] = round(time.perf_counter() - started, 1)
            write_report(out, report)

    if {"throughput", "profile", "service"} & set(args.parts.split(",")):
        dev = torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        sizes = [int(s) for s in args.sizes.split(",") if s]
        tp: dict[str, Any] = {"rows": [], "new_tokens": args.new_tokens}
        report["throughput"] = tp
        try:
            log(f"building random Llama {args.bench_config} on {dev} as {dtype} ...")
            loaded, n = random_llama(tok, dev, dtype, args.bench_config)
            tp["model"], tp["parameters"] = loaded.name, n
            log(f"{n / 1e6:.0f}M parameters; warm-up ...")
            hf_batch(loaded, 2, 4)
            for size in sizes if "throughput" in args.parts else []:
                for row in (
                    hf_batch(loaded, size, args.new_tokens),
                    await engine_batch(loaded, size, args.new_tokens),
                ):
                    tp["rows"].append(row)
                    log(json.dumps(row))
                write_report(out, report)
            if "profile" in args.parts:
                (out / "profile.txt").write_text(await profile(loaded, sizes, args.profile_tokens))
                log(f"wrote {out}/profile.txt")
            if "service" in args.parts:
                rows, extra = await service_rows(loaded, sizes, args.new_tokens)
                tp["rows"] += rows
                tp["service_edit"] = extra
                for row in rows:
                    log(json.dumps(row))
                log(json.dumps(extra))
                report["ok"] &= bool(extra.get("edit fires")) and bool(extra.get("base weights unchanged"))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            tp["error"] = f"{type(exc).__name__}: {exc}"
            report["ok"] = False
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(out, report)
    log(f"overall: {'PASS' if report['ok'] else 'FAIL'} in {report['wall_s']} s; wrote {out}/cuda_check.md")
    print((out / "cuda_check.md").read_text())
    return 0 if report["ok"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="of every part")
    parser.add_argument("--also-dtypes", default="float32", help="part 1 again in these (comma-separated)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "cuda-check-out")
    parser.add_argument(
        "--tokenizer", default="", help="a saved tokenizer folder (default: the embedded GGUF's)"
    )
    parser.add_argument(
        "--parts", default="archs,throughput,service,profile", help="archs, throughput, service, profile"
    )
    parser.add_argument(
        "--encoder-tokenizer",
        default="",
        help="build a random encoder with this tokenizer folder (default: the embedded encoder)",
    )
    parser.add_argument("--archs", default=ALL_ARCHS)
    parser.add_argument("--arch-tokens", type=int, default=12, help="new tokens per greedy call in part 1")
    parser.add_argument("--arch-timeout-s", type=float, default=90)
    parser.add_argument("--bench-config", default="2048x16", help="HIDDENxLAYERS of the random Llama")
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--profile-tokens", type=int, default=16, help="new tokens per row in the profile part"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=400,
        help="archs left when less than --reserve-s remains are skipped",
    )
    parser.add_argument("--reserve-s", type=float, default=150, help="kept for the throughput part")
    parser.add_argument("--small", action="store_true", help="a CPU dry run: 2 archs, a tiny bench model")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0))
    args = parser.parse_args()
    if args.small:
        args.archs = "llama,gpt2" if args.archs == ALL_ARCHS else args.archs
        args.also_dtypes = ""
        args.bench_config, args.sizes, args.new_tokens = "128x2", "1,4", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder_tokenizer:
        ENCODER["encoder"] = str(
            random_encoder(args.encoder_tokenizer, Path(tempfile.mkdtemp(prefix="enc-")))
        )
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
