"""Causal tracing (service/locate/trace.py): the math on tiny random Llama and GPT-2 layouts and on the
embedded SmolLM2, the Trace RPC through the real transport, and `editserve trace`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from service.errors import InvalidArgument
from service.hooks.arch import decoder_layers
from service.hooks.layer import param_checksum
from service.locate.trace import (
    KINDS,
    Patch,
    calculate_hidden_flow,
    circuit_summary,
    prepare_trace,
    traced_runs,
)

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tiny_checkpoints import save_tiny_checkpoint

    from service.engine.loader import load_model

    folder = save_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2", chat_template=False)
    return load_model(str(folder), device="cpu", dtype="float32")


def _restore_everything(model: Any, prompt: Any, samples: int = 2) -> tuple[float, float, float]:
    """(clean p, corrupted p, p with every layer's residual restored at every token)."""
    layers = len(decoder_layers(model))
    with traced_runs(model, prompt, samples=samples, seed=0) as run:
        rows = torch.arange(samples).repeat_interleave(len(prompt.ids))
        positions = torch.arange(len(prompt.ids)).repeat(samples)
        patches = [Patch("residual", i, rows, positions) for i in range(layers)]
        restored = run.restored(0, patches)
        return run.clean_p, run.corrupted_p, float(restored.mean())


def _hook_counts(model: Any) -> dict[int, int]:
    return {id(m): len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()}


def _check_tiny(loaded: Any) -> None:
    model, tok = loaded.model, loaded.tokenizer
    before = param_checksum(model)
    hooks_before = _hook_counts(model)
    prompt = prepare_trace(tok, PROMPT, SUBJECT)
    layers = len(decoder_layers(model))
    a = calculate_hidden_flow(model, prompt, samples=2, window=3, seed=7)
    b = calculate_hidden_flow(model, prompt, samples=2, window=3, seed=7)
    c = calculate_hidden_flow(model, prompt, samples=2, window=3, seed=8)
    for kind in KINDS:
        assert a.grid(kind).shape == (layers, len(prompt.ids))
        assert torch.equal(a.grid(kind), b.grid(kind)), f"{kind}: not deterministic under a seed"
        assert torch.isfinite(a.grid(kind)).all()
        # tokens before the subject are the same clean and corrupted: no effect at all
        assert not a.grid(kind)[:, : prompt.subject[0]].any()
    assert not torch.equal(a.residual, c.residual), "another seed, another noise"
    full = calculate_hidden_flow(model, prompt, samples=2, window=3, seed=7, use_suffix=False)
    for kind in KINDS:  # replaying only the tokens from the restored one on changes nothing
        assert torch.allclose(a.grid(kind), full.grid(kind), atol=1e-5), kind
    # the residual after the last layer at the last token is the whole clean state there
    assert a.residual[-1, -1] == pytest.approx(a.clean_p - a.corrupted_p, abs=1e-5)
    clean, corrupted, restored = _restore_everything(model, prompt)
    assert restored == pytest.approx(clean, abs=1e-5) and clean == pytest.approx(a.clean_p, abs=1e-6)
    mlp_top, attn_top = circuit_summary(a)
    assert len(mlp_top) == len(attn_top) == min(3, layers)
    assert all(0 <= layer < layers for layer, _ in mlp_top + attn_top)
    assert param_checksum(model) == before, "a trace wrote a parameter"
    assert _hook_counts(model) == hooks_before, "a trace left a forward hook behind"


def test_trace_on_a_tiny_llama(tiny_llama: Any) -> None:
    _check_tiny(tiny_llama)


def test_trace_on_a_tiny_gpt2(tiny_gpt2: Any) -> None:
    _check_tiny(tiny_gpt2)


@pytest.mark.parametrize("arch", ["opt", "mistral"])
def test_trace_on_other_layouts(arch: str, tmp_path: Path) -> None:
    """OPT flattens its MLP rows; Mistral's sliding window (8 tokens, shorter than the prompt) makes the
    suffix replay refuse, so every restoration replays all tokens."""
    from tiny_checkpoints import save_tiny_checkpoint

    from service.engine.loader import load_model

    loaded = load_model(str(save_tiny_checkpoint(arch, tmp_path / arch, chat_template=False)), device="cpu",
                        dtype="float32")
    prompt = prepare_trace(loaded.tokenizer, PROMPT, SUBJECT)
    with traced_runs(loaded.model, prompt, samples=2, seed=0) as run:
        assert (run.suffix is None) == (arch == "mistral")
    fast = calculate_hidden_flow(loaded.model, prompt, samples=2, window=2, seed=1)
    full = calculate_hidden_flow(loaded.model, prompt, samples=2, window=2, seed=1, use_suffix=False)
    for kind in KINDS:
        assert torch.allclose(fast.grid(kind), full.grid(kind), atol=1e-5), kind
    clean, _corrupted, restored = _restore_everything(loaded.model, prompt)
    assert restored == pytest.approx(clean, abs=1e-5)


def test_hooks_are_removed_on_error_and_act_only_in_their_thread(tiny_llama: Any) -> None:
    import threading

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    prompt = prepare_trace(tok, PROMPT, SUBJECT)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    seen: list[torch.Tensor] = []
    hooks_before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), traced_runs(model, prompt, samples=2, seed=0) as run:
        run.tracer.noise = (torch.ones(2, prompt.subject[1] - prompt.subject[0], 64) * 100, *prompt.subject)

        def other() -> None:  # a serving thread passes through the installed hooks untouched
            with torch.no_grad():
                seen.append(model(input_ids=ids).logits)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        raise RuntimeError("boom")
    # Not bit-equal: a new thread may run torch with another number of threads (another summation order).
    # The trace's noise (x100 on the subject's embeddings) would move these logits by far more.
    torch.testing.assert_close(seen[0], reference, rtol=1e-5, atol=1e-5)
    assert _hook_counts(model) == hooks_before


@pytest.mark.parametrize(("prompt", "subject", "answer", "field"), [
    ("", "x", "", "prompt"),
    ("   ", "x", "", "prompt"),
    (PROMPT, "", "", "subject"),
    (PROMPT, "the Louvre", "", "subject"),
    (PROMPT + " Paris" * 80, SUBJECT, "", "prompt"),
])
def test_bad_input_is_invalid_argument(tiny_llama: Any, prompt: str, subject: str, answer: str,
                                       field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        prepare_trace(tiny_llama.tokenizer, prompt, subject, answer)
    assert exc.value.field == field


def test_samples_and_window_out_of_range(tiny_llama: Any) -> None:
    prompt = prepare_trace(tiny_llama.tokenizer, PROMPT, SUBJECT)
    cases = (({"samples": 0}, "samples"), ({"samples": 65}, "samples"), ({"window": 0}, "window"),
             ({"window": 5}, "window"))
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument) as exc:
            calculate_hidden_flow(tiny_llama.model, prompt, **kwargs)
        assert exc.value.field == field


@pytest.mark.parametrize("use_suffix", [True, False])
def test_a_passed_deadline_stops_the_trace(tiny_llama: Any, use_suffix: bool) -> None:
    import time

    from service.errors import DeadlineExceeded

    prompt = prepare_trace(tiny_llama.tokenizer, PROMPT, SUBJECT)
    hooks_before = _hook_counts(tiny_llama.model)
    with pytest.raises(DeadlineExceeded):
        calculate_hidden_flow(tiny_llama.model, prompt, samples=1, window=2, use_suffix=use_suffix,
                              deadline=time.monotonic() - 1)
    assert _hook_counts(tiny_llama.model) == hooks_before


def test_answer_is_traced_by_its_first_token(tiny_llama: Any) -> None:
    tok = tiny_llama.tokenizer
    prompt = prepare_trace(tok, PROMPT, SUBJECT, " Paris")
    assert prompt.answer_id == tok(" Paris", add_special_tokens=False)["input_ids"][0]
    trace = calculate_hidden_flow(tiny_llama.model, prompt, samples=1, window=2, kinds=("residual",))
    assert trace.answer_id == prompt.answer_id
    assert not trace.mlp.any() and not trace.attention.any()  # kinds not asked for


# ------------------------------------------------------------------------------------------ RPC and CLI


@pytest.fixture(scope="module")
def served_tiny(tiny_llama: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from service.compose import load_data_plane
    from service.config import Settings
    from testkit.server_thread import ServerThread

    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("trace-data"), device="cpu",
                        dtype="float32", log_poll_s=0.0, health_poll_s=0.0, retrieval_enabled=False)
    with ServerThread(settings, lambda: load_data_plane(settings, loaded=tiny_llama)) as server:
        yield server


def test_trace_rpc_and_typed_client(served_tiny: Any) -> None:
    from service.client import EditServeClient

    with EditServeClient(served_tiny.address) as client:
        result = client.trace(PROMPT, SUBJECT, samples=2, window=2, seed=3)
        again = client.trace(PROMPT, SUBJECT, samples=2, window=2, seed=3)
    layers = 4
    assert result.residual.layers == layers and result.residual.tokens == len(result.tokens)
    assert len(result.mlp.values) == layers * len(result.tokens)
    assert "".join(result.tokens[result.subject_start : result.subject_end]).strip() == SUBJECT
    assert result.residual.values == again.residual.values
    assert 0 <= result.corrupted_probability <= 1 and 0 <= result.clean_probability <= 1
    assert len(result.mlp_at_subject) == 3 and len(result.attention_at_last) == 3
    assert result.samples == 2 and result.window == 2 and result.seed == 3 and result.seconds > 0


def test_async_client_trace_and_the_concurrency_bound(served_tiny: Any) -> None:
    import asyncio

    from service.client import AsyncEditServeClient, ResourceExhaustedError
    from service.dataplane import MAX_CONCURRENT_TRACES

    async def go() -> Any:
        async with AsyncEditServeClient(served_tiny.address) as client:
            return await client.trace(PROMPT, SUBJECT, answer=" Paris", samples=1, window=1)

    reply = asyncio.run(go())
    assert reply.answer == " Paris" and reply.samples == 1 and reply.window == 1
    plane = served_tiny.plane
    plane._traces = MAX_CONCURRENT_TRACES  # as if that many traces were running
    try:
        with pytest.raises(ResourceExhaustedError):
            asyncio.run(go())
    finally:
        plane._traces = 0


@pytest.mark.parametrize(("request_kwargs", "field"), [
    ({"prompt": PROMPT, "subject": "the Louvre"}, "subject"),
    ({"prompt": "", "subject": SUBJECT}, "prompt"),
    ({"prompt": PROMPT + " Paris" * 80, "subject": SUBJECT}, "prompt"),
    ({"prompt": PROMPT, "subject": SUBJECT, "samples": 0}, "samples"),
    ({"prompt": PROMPT, "subject": SUBJECT, "window": 99}, "window"),
])
def test_bad_trace_input_is_invalid_argument_over_grpc(served_tiny: Any, request_kwargs: dict,
                                                       field: str) -> None:
    from service._proto.editserve.v1 import editserve_pb2 as pb
    from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served_tiny.address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.LocateServiceStub(channel).Trace(pb.TraceRequest(**request_kwargs), timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc.value.details()


def test_cli_trace_draws_a_png_and_prints_json(served_tiny: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import run

    env = {"EDITSERVE_ADDRESS": served_tiny.address}
    out = tmp_path / "trace.png"
    code = run(["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2", "--window", "2",
                "--out", str(out)], env)
    text, err = capsys.readouterr()
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clean" in text and str(out) in text
    code = run(["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2", "--window", "2",
                "--json"], env)
    text, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(text)
    assert set(data) >= {"tokens", "residual", "mlp", "attention", "clean_probability",
                         "corrupted_probability", "mlp_at_subject", "attention_at_last"}
    assert len(data["residual"]) == 4 and len(data["residual"][0]) == len(data["tokens"])
    code = run(["trace", "--prompt", PROMPT, "--subject", "the Louvre", "--json"], env)
    _text, err = capsys.readouterr()
    assert code != 0 and "subject" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def eiffel(smollm: Any) -> Any:
    """One full trace of the embedded model (server defaults: 3 noise samples, window 10, seed 0)."""
    prompt = prepare_trace(smollm.tokenizer, PROMPT, SUBJECT)
    return prompt, calculate_hidden_flow(smollm.model, prompt, samples=3, window=10, seed=0)


@pytest.mark.smollm
def test_smollm_trace_shape(smollm: Any, eiffel: Any) -> None:
    prompt, trace = eiffel
    layers = len(decoder_layers(smollm.model))
    tokens = [smollm.tokenizer.decode([i]) for i in prompt.ids]
    assert "".join(tokens[slice(*trace.subject)]) == SUBJECT
    for kind in KINDS:
        assert trace.grid(kind).shape == (layers, len(prompt.ids))
    assert smollm.tokenizer.decode([trace.answer_id]) == " Paris"
    assert trace.clean_p > 0.3 and trace.corrupted_p < trace.clean_p / 5  # the noise hides the subject
    # restoring the last layer's residual at the last token gives the whole clean probability back
    assert trace.residual[-1, -1] == pytest.approx(trace.clean_p - trace.corrupted_p, abs=1e-4)
    print(f"\nSmolLM2 trace of {len(prompt.ids)} tokens, 3 samples: {trace.seconds:.1f} s")


@pytest.mark.smollm
def test_smollm_restoring_every_residual_gives_back_the_clean_probability(smollm: Any) -> None:
    prompt = prepare_trace(smollm.tokenizer, PROMPT, SUBJECT)
    clean, corrupted, restored = _restore_everything(smollm.model, prompt, samples=2)
    assert corrupted < clean / 5
    assert restored == pytest.approx(clean, abs=1e-4)


@pytest.mark.smollm
def test_smollm_attention_carries_the_fact_to_the_last_token_in_later_layers(eiffel: Any) -> None:
    _prompt, trace = eiffel
    layers = trace.attention.shape[0]
    best = int(trace.attention[:, -1].argmax())
    assert best >= layers // 2, f"largest attention effect at the last token at layer {best} of {layers}"
    _mlp_top, attn_top = circuit_summary(trace)
    assert attn_top[0][0] == best


@pytest.mark.smollm
def test_smollm_mlp_effect_on_the_subject_lies_in_lower_layers(smollm: Any, eiffel: Any) -> None:
    """The subject token whose MLP restoration matters most is " iffel" here, not the last one (" Tower"):
    its largest MLP effect lies in the lower half of the layers."""
    _prompt, trace = eiffel
    start, end = trace.subject
    layers = trace.mlp.shape[0]
    sub = trace.mlp[:, start:end]
    layer, _token = divmod(int(sub.argmax()), end - start)
    assert layer < layers // 2, f"largest MLP effect over the subject at layer {layer} of {layers}"


@pytest.mark.smollm
@pytest.mark.xfail(strict=False, reason="SmolLM2 disagrees with ROME here: at the subject's last token "
                   "(' Tower') no MLP window restores more than ~0.01 of p(' Paris'); the fact is read "
                   "at ' iffel'")
def test_smollm_mlp_effect_at_the_subject_last_token_lies_in_lower_to_middle_layers(eiffel: Any) -> None:
    _prompt, trace = eiffel
    mlp_top, _attn_top = circuit_summary(trace)
    layers = trace.mlp.shape[0]
    assert mlp_top[0][1] > 0.05 and mlp_top[0][0] < layers // 2


@pytest.mark.smollm
def test_smollm_trace_is_deterministic_under_a_seed(smollm: Any) -> None:
    prompt = prepare_trace(smollm.tokenizer, PROMPT, SUBJECT)
    runs = [calculate_hidden_flow(smollm.model, prompt, samples=1, seed=s, kinds=("residual",))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].residual, runs[1].residual)
    assert runs[0].corrupted_p == runs[1].corrupted_p != runs[2].corrupted_p
