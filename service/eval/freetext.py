"""`editserve eval --format freetext`: free-text (descriptor) edits asked as chat and as raw questions.

CounterFact and zsRE probe completion prompts by log-probability; a product backend asks questions. Here
each record is one descriptor edit ("The mascot of the Zorbian Space Agency is a purple llama named
Quimby.") with in-scope questions that avoid the descriptor's words (direct, paraphrase, reasoning) and
out-of-scope questions (neighbours, unrelated). Every question is asked twice, as a chat message and as a
raw prompt, greedily, and judged on the generated text:

  in-scope success   the answer uses the new fact: `match` (any answer alias occurs, normalised) and
                     `judge` (match, and the answer neither asserts an old alias nor negates the new one;
                     validated by hand: docs/free-text-edits.md)
  out-of-scope kept  the answer is the unedited model's answer to the same question, character for character
  empty              the answer is blank

Protocol as in `editserve eval`: T records are edited one after another (Edit with the descriptor only,
the server's defaults decide compilation), all their questions are asked, then RollbackTo undoes the
round. Methods: "unedited" (before any edit; also the out-of-scope reference), "off" (use_edits=false with
the round's edits applied; byte-identical to unedited by construction, measured to show it), "retrieval",
"hook", "both" (the product: every path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

FREETEXT_METHODS = ("unedited", "off", "retrieval", "hook", "both")
STYLES = ("chat", "raw")
DEFAULT_MAX_NEW_TOKENS = 32


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Question:
    text: str
    type: str  # in scope: direct | paraphrase | reasoning; out of scope: neighbour | unrelated
    answers: tuple[str, ...] = ()  # in scope only: any alias in the answer = the new fact is used


@dataclass(frozen=True)
class FreetextRecord:
    index: int
    id: str
    kind: str  # fictional | counterfactual
    relation: str
    descriptor: str
    old_answers: tuple[str, ...]
    in_scope: tuple[Question, ...]
    out_of_scope: tuple[Question, ...]


def load_freetext(path: Path, n: int | None = None) -> list[FreetextRecord]:
    """JSON Lines (or a JSON array) in the format of service/eval/freetext_data.py."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        raw = json.loads(text)
    else:
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    records = []
    for i, r in enumerate(raw[: n if n is not None else len(raw)]):
        answers = tuple(r.get("answers", ()))
        records.append(
            FreetextRecord(
                index=i,
                id=str(r.get("id", i)),
                kind=str(r.get("kind", "")),
                relation=str(r.get("relation", "")),
                descriptor=str(r["descriptor"]),
                old_answers=tuple(r.get("old_answers", ())),
                in_scope=tuple(
                    Question(q["question"], q.get("type", "direct"), tuple(q.get("answers") or answers))
                    for q in r["in_scope"]
                ),
                out_of_scope=tuple(
                    Question(q["question"], q.get("type", "unrelated")) for q in r["out_of_scope"]
                ),
            )
        )
    return records


# ------------------------------------------------------------------------------------------ judging

_PUNCT = re.compile(r"[^\w\s]")
_FORMER = re.compile(r"\b(?:from|formerly|previously|used to be in|no longer in|once|was in)\s*$")
_NEGATION = re.compile(r"\b(?:not|no longer|isn't|wasn't|never|neither|nor)\b")


def normalise(text: str) -> str:
    """Casefold, NFKC, punctuation to spaces, articles dropped, spaces collapsed."""
    text = _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _contains(haystack: str, alias: str) -> bool:
    needle = normalise(alias)
    return bool(needle) and f" {needle} " in f" {haystack} "


def matches(answer: str, aliases: Sequence[str]) -> bool:
    """Normalised match: some alias occurs in the answer as whole words."""
    norm = normalise(answer)
    return any(_contains(norm, a) for a in aliases)


def judge(answer: str, aliases: Sequence[str], old_aliases: Sequence[str]) -> bool:
    """The answer uses the new fact: it matches, no sentence that names the new fact negates it, and the
    old fact appears at most as the former one ("moved from Paris to Rome" passes, "Paris, not Rome" and
    "It is in Paris. Or Rome." fail)."""
    if not matches(answer, aliases):
        return False
    sentences = [s for s in re.split(r"(?<=[.!?\n])\s*", answer) if s.strip()]
    for sentence in sentences:
        norm = normalise(sentence)
        if any(_contains(norm, a) for a in aliases) and _NEGATION.search(norm):
            return False
    norm = normalise(answer)
    for old in old_aliases:
        needle = normalise(old)
        for m in re.finditer(rf"(?:^| ){re.escape(needle)}(?= |$)", norm):
            if not _FORMER.search(norm[max(0, m.start() - 30) : m.start()]):
                return False
    return True


def is_empty(answer: str) -> bool:
    return not answer.strip()


# ------------------------------------------------------------------------------------------ protocol


@dataclass
class FreetextConfig:
    data: Path
    out: Path
    n: int | None = None
    sequential: list[int] = field(default_factory=lambda: [1])
    methods: list[str] = field(default_factory=lambda: ["unedited", "both"])
    server: str | None = None
    admin_token: str = ""
    concurrency: int = 48
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int | None = None  # None: the server's default (1); 0 reproduces servers without it
    unedited_from: Path | None = None  # reuse another run's unedited answers (same model, same settings)
    model: str = "embedded"
    device: str = "cpu"
    label: str = ""  # names this configuration in the report (e.g. the server settings under test)
    command: list[str] = field(default_factory=list)


@dataclass
class Answer:
    record: int
    scope: str  # in | out
    qtype: str
    style: str  # chat | raw
    question: str
    text: str
    fired: list[list[Any]] = field(default_factory=list)  # [edit_id, path, score] of applied edits


def _questions(r: FreetextRecord) -> list[tuple[str, Question]]:
    return [("in", q) for q in r.in_scope] + [("out", q) for q in r.out_of_scope]


async def _ask_all(
    client: Any, records: Sequence[FreetextRecord], method: str, cfg: FreetextConfig, sem: asyncio.Semaphore,
    bar: tqdm | None = None,
) -> list[Answer]:
    async def one(r: FreetextRecord, scope: str, q: Question, style: str) -> Answer:
        async with sem:
            text, applied = await client.ask(
                q.text, style=style, method=method, max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=cfg.min_new_tokens,
            )
        if bar is not None:
            bar.update(1)
        return Answer(r.index, scope, q.type, style, q.text, text, applied)

    jobs = [one(r, scope, q, style) for r in records for scope, q in _questions(r) for style in STYLES]
    return list(await asyncio.gather(*jobs))


async def run_freetext(cfg: FreetextConfig, *, loaded: Any = None) -> dict[str, Any]:
    records = load_freetext(cfg.data, cfg.n)
    cfg.out.mkdir(parents=True, exist_ok=True)
    async with _client(cfg, loaded) as client:
        info = await client.info()
        sem = asyncio.Semaphore(cfg.concurrency)
        results: dict[str, Any] = {
            "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}},
            "server": {"model": info.model_name, "hook_layers": list(info.hook_layers),
                       "settings_env": _settings_env()},
            "records": len(records),
            "rounds": {},
        }
        unedited = await _unedited(client, records, cfg, sem)
        results["unedited_answers"] = [asdict(a) for a in unedited]
        for t in cfg.sequential:
            results["rounds"][str(t)] = await _protocol(client, records, t, cfg, sem)
    results["summary"] = summarise(records, unedited, results["rounds"])
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (cfg.out / "summary.md").write_text(render_summary(cfg, results), encoding="utf-8")
    return results


async def _unedited(
    client: Any, records: Sequence[FreetextRecord], cfg: FreetextConfig, sem: asyncio.Semaphore
) -> list[Answer]:
    path = cfg.unedited_from or cfg.out / "unedited.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        same = (saved.get("max_new_tokens"), saved.get("min_new_tokens"), saved.get("data")) == (
            cfg.max_new_tokens, cfg.min_new_tokens, str(cfg.data.resolve())
        )
        if same:
            by_key = {(a["record"], a["style"], a["question"]): a for a in saved["answers"]}
            wanted = [(r.index, s, q.text) for r in records for _, q in _questions(r) for s in STYLES]
            if all(k in by_key for k in wanted):
                log.info("unedited answers reused from %s", path)
                return [Answer(**by_key[k]) for k in wanted]
    total = sum(len(_questions(r)) * len(STYLES) for r in records)
    with tqdm(total=total, desc="unedited") as bar:
        answers = await _ask_all(client, records, "unedited", cfg, sem, bar)
    (cfg.out / "unedited.json").write_text(
        json.dumps({"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                    "data": str(cfg.data.resolve()),
                    "answers": [asdict(a) for a in answers]}),
        encoding="utf-8",
    )
    return answers


async def _protocol(
    client: Any, records: Sequence[FreetextRecord], t: int, cfg: FreetextConfig, sem: asyncio.Semaphore
) -> dict[str, Any]:
    methods = [m for m in cfg.methods if m != "unedited"]
    answers: dict[str, list[Answer]] = defaultdict(list)
    edits: list[dict[str, Any]] = []
    rounds = [list(records[i : i + t]) for i in range(0, len(records), t)]
    per_round = sum(len(_questions(r)) * len(STYLES) for r in records[:t]) * len(methods)
    with tqdm(total=len(records) + per_round * len(rounds), desc=f"T={t}") as bar:
        for chunk in rounds:
            before = int((await client.info()).edit_version)
            for r in chunk:
                started = time.perf_counter()
                edit = await client.edit_descriptor(r.descriptor, key=f"freetext-{t}-{r.id}-{before}")
                edits.append({"record": r.index, "seconds": time.perf_counter() - started, **edit})
                bar.update(1)
            for method in methods:
                answers[method] += await _ask_all(client, chunk, method, cfg, sem, bar)
            await client.rollback_to(before, reason="freetext evaluation round done")
    return {"edits": edits, "answers": {m: [asdict(a) for a in a_list] for m, a_list in answers.items()}}


# ------------------------------------------------------------------------------------------ metrics


def summarise(
    records: Sequence[FreetextRecord], unedited: Sequence[Answer], rounds: dict[str, Any]
) -> dict[str, Any]:
    """{T: {method: metrics}}; the unedited answers are T-independent ("unedited" under every T)."""
    by_index = {r.index: r for r in records}
    reference = {(a.record, a.style, a.question): a.text for a in unedited}
    out: dict[str, Any] = {}
    for t, rnd in rounds.items():
        rows = {"unedited": metrics(by_index, [asdict(a) for a in unedited], reference)}
        for method, answers in rnd["answers"].items():
            rows[method] = metrics(by_index, answers, reference)
        seconds = sorted(e["seconds"] for e in rnd["edits"])
        rows["_edits"] = {
            "n": len(seconds),
            "mean_s": sum(seconds) / len(seconds) if seconds else 0.0,
            "p90_s": seconds[int(0.9 * (len(seconds) - 1))] if seconds else 0.0,
            "hook_entries": sum(1 for e in rnd["edits"] if e.get("kind") == "triple"),
            "derived": sum(1 for e in rnd["edits"] if e.get("derived")),
        }
        out[t] = rows
    return out


def metrics(
    by_index: dict[int, FreetextRecord], answers: Sequence[dict[str, Any]], reference: dict[tuple, str]
) -> dict[str, Any]:
    tally: dict[str, list[float]] = defaultdict(list)
    for a in answers:
        r = by_index[a["record"]]
        style, text = a["style"], a["text"]
        tally[f"{style}_empty"].append(float(is_empty(text)))
        if a["scope"] == "in":
            q = next(q for q in r.in_scope if q.text == a["question"])
            hit, ok = matches(text, q.answers), judge(text, q.answers, r.old_answers)
            for key in (style, f"{style}_{q.type}", f"{style}_{r.kind}"):
                tally[f"{key}_match"].append(float(hit))
                tally[f"{key}_judge"].append(float(ok))
        else:
            kept = text == reference[(a["record"], style, a["question"])]
            tally[f"{style}_kept"].append(float(kept))
            tally[f"{style}_kept_{a['qtype']}"].append(float(kept))
    return {k: {"mean": sum(v) / len(v), "n": len(v)} for k, v in sorted(tally.items())}


def _cell(row: dict[str, Any], key: str) -> str:
    m = row.get(key)
    return "" if m is None else f"{m['mean']:.3f}"


def render_summary(cfg: FreetextConfig, results: dict[str, Any]) -> str:
    lines = [
        "# Free-text edits in chat and raw questions",
        "",
        f"Command: `{' '.join(cfg.command)}`" if cfg.command else "",
        f"Data: {cfg.data} ({results['records']} records); model {results['server']['model']}, hook layers "
        f"{results['server']['hook_layers']}; server settings "
        f"{results['server']['settings_env'] or 'defaults'}"
        + (f"; label {cfg.label}" if cfg.label else ""),
        "",
        "In-scope: share of answers using the new fact (judge; normalised match in brackets). Out-of-scope: "
        "share identical to the unedited answer. Empty: share of blank answers (every question).",
        "",
        "| T | method | chat in-scope | raw in-scope | chat out-of-scope kept | raw out-of-scope kept | "
        "chat empty | raw empty |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t, rows in results["summary"].items():
        for method, row in rows.items():
            if method.startswith("_"):
                continue
            lines.append(
                f"| {t} | {method} | {_cell(row, 'chat_judge')} ({_cell(row, 'chat_match')}) | "
                f"{_cell(row, 'raw_judge')} ({_cell(row, 'raw_match')}) | {_cell(row, 'chat_kept')} | "
                f"{_cell(row, 'raw_kept')} | {_cell(row, 'chat_empty')} | {_cell(row, 'raw_empty')} |"
            )
    lines += ["", "By question type (judge; chat / raw):", "",
              "| T | method | direct | paraphrase | reasoning | fictional | counterfactual |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, rows in results["summary"].items():
        for method, row in rows.items():
            if method.startswith("_"):
                continue
            cells = [
                f"{_cell(row, f'chat_{k}_judge')} / {_cell(row, f'raw_{k}_judge')}"
                for k in ("direct", "paraphrase", "reasoning", "fictional", "counterfactual")
            ]
            lines.append(f"| {t} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "Edits:", ""]
    for t, rows in results["summary"].items():
        e = rows["_edits"]
        lines.append(
            f"- T={t}: {e['n']} edits, mean {e['mean_s']:.2f} s, p90 {e['p90_s']:.2f} s; compiled from the "
            f"descriptor {e['derived']}, with a hook entry {e['hook_entries']}"
        )
    return "\n".join(lines) + "\n"


def _settings_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("EDITSERVE_") and "TOKEN" not in k}


# ------------------------------------------------------------------------------------------ client


class _Client:
    """The few calls the protocol needs, on top of the evaluation's gRPC client."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def info(self) -> Any:
        return await self.inner.info()

    async def edit_descriptor(self, descriptor: str, key: str) -> dict[str, Any]:
        from service._proto.editserve.v1 import editserve_pb2 as pb

        resp = await self.inner._call(
            self.inner._edit.Edit,
            pb.EditRequest(descriptor=descriptor, idempotency_key=key, actor="eval"),
            metadata=self.inner._metadata,
        )
        record = await self.inner.get_edit(resp.edit_id)
        return {
            "edit_id": resp.edit_id,
            "kind": "triple" if record.hook_layers else "descriptor",
            "derived": bool(record.derived_from_descriptor),
            "gate_passed": bool(resp.report.passed),
            "message": resp.report.message,
            "subject": record.subject,
            "target_new": record.target_new,
        }

    async def rollback_to(self, version: int, reason: str) -> int:
        return int(await self.inner.rollback_to(version, reason=reason))

    async def ask(
        self,
        question: str,
        *,
        style: str,
        method: str,
        max_new_tokens: int,
        min_new_tokens: int | None = None,
    ) -> tuple[str, list]:
        from service._proto.editserve.v1 import editserve_pb2 as pb
        from service.eval.client import _PATH_NAMES, _set_method

        if style == "chat":
            req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)])
        else:
            req = pb.GenerateRequest(prompt=question)
        req.max_new_tokens = max_new_tokens
        if min_new_tokens is not None:
            req.min_new_tokens = min_new_tokens
        _set_method(req, "unedited" if method in ("unedited", "off") else method)
        resp = await self.inner._call(self.inner._gen.Generate, req)
        applied = [
            [e.edit_id, _PATH_NAMES.get(e.path, "?"), round(float(e.score), 4)] for e in resp.applied_edits
        ]
        return str(resp.text), applied


class _client:  # noqa: N801 - an async context manager used like a function
    def __init__(self, cfg: FreetextConfig, loaded: Any) -> None:
        self.cfg, self.loaded = cfg, loaded
        self._stack: Any = None

    async def __aenter__(self) -> _Client:
        from contextlib import AsyncExitStack

        from service.eval.client import EditServeClient

        self._stack = AsyncExitStack()
        if self.cfg.server:
            inner = await self._stack.enter_async_context(
                EditServeClient(self.cfg.server, admin_token=self.cfg.admin_token)
            )
        else:
            from service.engine.loader import load_model
            from service.eval.inprocess import in_process_server
            from service.settings_args import settings_from

            # No resuming here: a fresh edit log, so an interrupted run leaves no edit behind.
            shutil.rmtree(self.cfg.out / "server-data", ignore_errors=True)

            base = replace(settings_from(argparse.Namespace(), os.environ), model=self.cfg.model,
                           device=self.cfg.device)
            if "EDITSERVE_MAX_BATCH_SIZE" not in os.environ:
                base = replace(base, max_batch_size=max(base.max_batch_size, self.cfg.concurrency))
            loaded = self.loaded or load_model(self.cfg.model, device=self.cfg.device, dtype="auto")
            srv = await self._stack.enter_async_context(
                in_process_server(self.cfg.out / "server-data", loaded=loaded, base=base)
            )
            inner = await self._stack.enter_async_context(
                EditServeClient(srv.address, admin_token=srv.admin_token)
            )
        await inner.wait_ready()
        return _Client(inner)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def run_freetext_sync(cfg: FreetextConfig, *, loaded: Any = None) -> dict[str, Any]:
    return asyncio.run(run_freetext(cfg, loaded=loaded))
