"""The model side of the engine: left-padded KV caches and the forward passes over them.

Layout invariant: in every cache, row i's real tokens are the rightmost `lengths[i]` columns (left padding).
Prefill pads prompts on the left, decode appends one column for every row, merging pads the narrower cache
on the left, and dropping rows trims the leading columns no remaining row needs. So the attention mask is a
pure function of (width, lengths), and position ids are each row's own count of real tokens: padding never
shifts a row's positions and padded keys get exactly zero attention weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from service.engine.adapter import RowAdapter
from service.engine.gate import GateRecorder, HookGate
from service.engine.loader import LoadedModel
from service.engine.packed_weights import PackedLinears
from service.engine.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from service.kvcache import GrowingLayer, growing_cache, left_padded, pad_columns_left

# Batch compositions whose per-row hook switch stays on the device; past it the cache starts over
# (compositions come and go, a handful is live at once).
ROW_FLAG_CACHE = 256


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_from(config: object, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A full-width cache adopting `kv` (every layer a GrowingLayer: see service/kvcache.py for why
    sliding-window layers get one too)."""
    cache = growing_cache()
    for i, (k, v) in enumerate(kv):
        while len(cache.layers) <= i:
            cache.layers.append(GrowingLayer())
        layer = cache.layers[i]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v  # adopt the tensors: `update` would copy them once more
    return cache


def plan_prefill_groups(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Split prompts into prefill forwards so that padded tokens plus a fixed cost per forward (reading every
    weight once, worth about `overhead_tokens` tokens of compute) is smallest. One forward over prompts of
    very different lengths mostly computes padding; one forward per prompt reads the weights many times.

    Over prompts sorted by length an optimal split is into contiguous runs, so a small dynamic programme
    finds it. Returns groups of indices into `lengths`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    cost = [0] * (n + 1)  # cost[j]: best cost of the j shortest prompts
    cut = [0] * (n + 1)  # cut[j]: where the last group of that best split starts
    for j in range(1, n + 1):
        widest = lengths[order[j - 1]]  # the longest prompt of any group ending at j
        cost[j], cut[j] = min((cost[i] + overhead_tokens + (j - i) * widest, i) for i in range(j))
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class KVState:
    """A left-padded cache over some rows and each row's number of real (cached) tokens."""

    cache: DynamicCache
    lengths: list[int]
    # hooked layer -> [rows, d_ff]: the MLP key of each row's last token, for the hook gate's
    # previous-token condition at the next decode step (see hooks/layer.py)
    hook_keys: dict[int, torch.Tensor] = field(default_factory=dict)

    # `lengths` on the device, made once per batch composition and advanced there by each decode step
    _device_lengths: torch.Tensor | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length()

    def device_lengths(self, device: torch.device) -> torch.Tensor:
        if self._device_lengths is None or self._device_lengths.shape[0] != len(self.lengths):
            self._device_lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        return self._device_lengths

    def advance_device_lengths(self) -> None:
        if self._device_lengths is not None:
            self._device_lengths = self._device_lengths + 1

    def __len__(self) -> int:
        return len(self.lengths)

    def select(self, rows: Sequence[int], config: object) -> KVState:
        """Only `rows`, in that order, without the leading columns that are padding for all of them."""
        lengths = [self.lengths[r] for r in rows]
        cut = self.width - max(lengths)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.cache.layers[0].keys.device)
        kv = [
            (k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:])
            for k, v in _layer_tensors(self.cache)
        ]
        keys = {i: t.index_select(0, index.to(t.device)) for i, t in self.hook_keys.items()}
        return KVState(_cache_from(config, kv), lengths, keys)

    def concat(self, other: KVState, config: object) -> KVState:
        """Rows of self then rows of other; the narrower cache is padded on the left with zeros."""
        width = max(self.width, other.width)

        def left_pad(t: torch.Tensor) -> torch.Tensor:
            return pad_columns_left(t, width)

        kv = [
            (torch.cat([left_pad(k1), left_pad(k2)]), torch.cat([left_pad(v1), left_pad(v2)]))
            for (k1, v1), (k2, v2) in zip(
                _layer_tensors(self.cache), _layer_tensors(other.cache), strict=True
            )
        ]
        # a layer only one side has (its table was empty then) is dropped: unknown for one step
        keys = {
            i: torch.cat([t, other.hook_keys[i].to(t.device)])
            for i, t in self.hook_keys.items()
            if i in other.hook_keys
        }
        return KVState(_cache_from(config, kv), self.lengths + other.lengths, keys)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, V] float32: the next-token logits of every row
    fires: list[dict[str, float]]  # per row: edit_id -> best gate score at this forward's real tokens
    fired_tokens: list[int]  # per row: real tokens of this forward where some edit fired
    edit_version: int  # version of the hook table this forward used (0 without hooks)
    # a decode step's gate decisions still on the device (GateRecorder.defer); `host_tokens` fetches them
    pending: GateRecorder | None = None

    def host_tokens(self, tokens: torch.Tensor) -> list[int]:
        """`tokens` ([B] ids on the device) as a list, and `fires`/`fired_tokens` filled in from deferred
        gate decisions in the same device-to-host copy: a decode step's only one."""
        rec, self.pending = self.pending, None
        if rec is None or not rec.pending:
            return tokens.tolist()
        n = tokens.numel()
        # float32 holds every id below 2**24 exactly (vocabularies are far smaller)
        host = torch.cat([tokens.to(torch.float32), rec.packed_pending()]).cpu().numpy()
        rec.take_pending(host[n:])
        self.fires, self.fired_tokens = ModelRunner._collect(rec, len(self.fires))
        return [int(t) for t in host[:n]]


@dataclass
class ScoreOutput:
    logprobs: list[float]  # log p of each continuation token given everything before it
    greedy: list[bool]  # whether each continuation token was the argmax at its position
    edit_version: int
    hook_fires: dict[str, float]
    argmax: list[int] = field(default_factory=list)  # the argmax token at each continuation position


def _base_table(table: Any) -> Any:
    """The published table a namespace view (HookTable.scoped) shares its tensors with."""
    return getattr(table, "base", table)


def _table_scope(table: Any) -> frozenset[str] | None:
    """The namespaces a row's table view lets fire (None: all of them)."""
    return getattr(table, "scope", None)


class ModelRunner:
    """Runs prefill, decode and teacher-forced forwards; must be called from one thread at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        hooks: HookGate | None,
        prefix_cache: PrefixCache | None = None,
        adapter: RowAdapter | None = None,
        packed_weights: bool = True,
    ) -> None:
        """`packed_weights`: on a CPU, forwards of several rows use oneDNN-packed Linear weights
        (engine/packed_weights.py)."""
        self.model = loaded.model
        self.adapter = adapter  # applied to the rows flagged `adapted` (injected descriptors) only
        self.config = loaded.model.config
        self.device = loaded.device
        self.hooks = hooks
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)  # any id works: padded columns are masked out
        # Off the CPU, decode steps read no gate decision back mid-forward (see GateRecorder.defer); on the
        # CPU a read costs nothing and lets a step where nothing fired skip the value add.
        self.defer_fires = self.device.type != "cpu"
        self._row_flags: dict[tuple[bool, ...], torch.Tensor] = {}  # hooks on/off per batch, on the device
        self.packed = PackedLinears(self.model) if packed_weights and self.device.type == "cpu" else None

    def _forward(self, **kwargs: Any) -> Any:
        """The model's forward; on a CPU with the packed Linear weights switched on for it."""
        with self.packed.active() if self.packed else nullcontext():
            return self.model(**kwargs)

    # ---- hooks --------------------------------------------------------------------------------
    @contextmanager
    def _hook_scope(
        self,
        enabled: Sequence[bool],
        offsets: Sequence[int],
        prev_keys: dict[int, torch.Tensor] | None = None,
        tables: Sequence[Any] | None = None,
    ) -> Iterator[tuple[GateRecorder | None, list[int]]]:
        """Pin each row's table for the whole forward (a publish mid-forward cannot mix two versions across
        layers; a request keeps the table it started with: `tables`, None = the current one) and record
        fires with per-row position offsets (negative over left padding). Yields the recorder and each
        row's table version."""
        if self.hooks is None:
            yield None, [0] * len(enabled)
            return
        current = self.hooks.current
        row_tables = [current if t is None else t for t in (tables or [None] * len(enabled))]
        # A request's table may be a namespace view of a published table (HookTable.scoped): rows are
        # grouped by the published table, and each row's namespaces become a per-row mask in the gate, so
        # a batch mixing namespaces still runs one gate matmul per layer.
        bases = [_base_table(t) for t in row_tables]
        row_scopes = [_table_scope(t) for t in row_tables]
        distinct = list({id(t): t for t in bases}.values())
        versions = [int(t.version) for t in row_tables]
        flags = self._flags(enabled)
        if len(distinct) == 1:
            scope: Any = ExitStack()
            scope.enter_context(self.hooks.table_override(distinct[0]))
        else:
            scope = nullcontext()
        with scope, self.hooks.recording(flags) as rec:
            if len(distinct) > 1:  # rows of this forward started under different edit sets
                rec.row_tables = [(t, self._flags([r is t for r in bases])) for t in distinct]
            rec.row_scopes = row_scopes if any(s is not None for s in row_scopes) else None
            rec.position_offset = list(offsets)
            rec.prev_keys = prev_keys
            rec.defer = self.defer_fires
            yield rec, versions

    def _adapter_scope(self, adapted: Sequence[bool] | None) -> Any:
        return nullcontext() if self.adapter is None else self.adapter.rows(adapted)

    def _flags(self, enabled: Sequence[bool]) -> torch.Tensor:
        """The per-row hooks switch on the device, copied there once per batch composition, not per step."""
        key = tuple(bool(e) for e in enabled)
        flags = self._row_flags.get(key)
        if flags is None:
            if len(self._row_flags) >= ROW_FLAG_CACHE:
                self._row_flags.clear()
            flags = self._row_flags[key] = torch.tensor(key, dtype=torch.bool, device=self.device)
        return flags

    @staticmethod
    def _collect(
        rec: GateRecorder | None, rows: int, before: Sequence[int] | None = None
    ) -> tuple[list[dict[str, float]], list[int]]:
        """Per row: the best score of each edit that fired, and at how many tokens something fired; with
        `before`, only over each row's positions below before[row] (its prompt)."""
        fires: list[dict[str, float]] = [{} for _ in range(rows)]
        fired_positions: list[set[int]] = [set() for _ in range(rows)]
        if rec is not None:
            rec.resolve()
            for f in rec.fires:
                if f.position < 0 or (before is not None and f.position >= before[f.row]):
                    continue  # a padding column, not one of the row's tokens (or not of its prompt)
                best = fires[f.row].get(f.edit_id)
                if best is None or f.score > best:
                    fires[f.row][f.edit_id] = f.score
                fired_positions[f.row].add(f.position)
        return fires, [len(p) for p in fired_positions]

    # ---- forwards -----------------------------------------------------------------------------
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        hooks_enabled: Sequence[bool],
        tables: Sequence[Any] | None = None,
        adapted: Sequence[bool] | None = None,
    ) -> tuple[ForwardOutput, KVState]:
        """`adapted`: per row, whether the alignment adapter applies (None: no row)."""
        lengths = [len(p) for p in prompts]
        adapted = self._adapted(adapted, len(prompts))
        batch = left_padded(prompts, self.pad_id)
        input_ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
        pads = batch.pads
        cache = growing_cache()
        with (
            self._hook_scope(hooks_enabled, [-p for p in pads], None, tables) as (rec, versions),
            self._adapter_scope(adapted),
        ):
            out = self._forward(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # only the last column's logits are needed: skips most of the LM head
            )
        fires, fired = self._collect(rec, len(prompts))
        logits = out.logits[:, -1, :].float()
        keys = {} if rec is None else dict(rec.last_keys)
        if self.prefix_cache.enabled:
            self._keep_prefixes(
                out.past_key_values, logits, keys, prompts, hooks_enabled, pads, fires, fired, versions,
                adapted, self._scopes(len(prompts), tables),
            )
        return ForwardOutput(logits, fires, fired, max(versions)), KVState(out.past_key_values, lengths, keys)

    def prefill_chunk(
        self,
        state: KVState | None,
        chunk: Sequence[int],
        use_hooks: bool,
        table: Any = None,
        adapted: bool = False,
    ) -> tuple[ForwardOutput, KVState]:
        """The next piece of one row's prompt: a forward over `chunk` on top of `state`, the cache of the
        row's earlier pieces (None: `chunk` begins the prompt). Positions and fire offsets are the row's
        true ones, and the gate's previous-token condition at the chunk's first token reads the earlier
        piece's last key (`state.hook_keys`), as a decode step does, so the pieces together compute what
        one `prefill` of the whole prompt computes. Returns this forward's output and the grown state."""
        start = 0 if state is None else state.lengths[0]
        n = len(chunk)
        prev_keys = None if state is None else state.hook_keys
        with (
            self._hook_scope([use_hooks], [start], prev_keys, [table]) as (rec, versions),
            self._adapter_scope(self._adapted([adapted], 1)),
        ):
            out = self._forward(
                input_ids=torch.tensor([list(chunk)], dtype=torch.long, device=self.device),
                attention_mask=torch.ones((1, start + n), dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, start + n, device=self.device)[None, :],
                past_key_values=growing_cache() if state is None else state.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        fires, fired = self._collect(rec, 1)
        keys = {} if rec is None else dict(rec.last_keys)
        output = ForwardOutput(out.logits[:, -1, :].float(), fires, fired, versions[0])
        return output, KVState(out.past_key_values, [start + n], keys)

    def keep_prompt_state(
        self,
        prompt: Sequence[int],
        state: KVState,
        out: ForwardOutput,
        use_hooks: bool,
        table: Any = None,
        adapted: bool = False,
    ) -> None:
        """Keep (prefix_cache.py) the state a chunked prefill left: one row, no padding, the whole prompt;
        `out` carries the last chunk's logits and the fires over every chunk."""
        if not self.prefix_cache.enabled:
            return
        self._keep_prefixes(
            state.cache, out.logits, state.hook_keys, [prompt], [use_hooks], [0], out.fires, out.fired_tokens,
            self._versions(1, [table]), self._adapted([adapted], 1), self._scopes(1, [table]),
        )

    def _adapted(self, adapted: Sequence[bool] | None, rows: int) -> list[bool]:
        """Per-row adapter flags; all off without an adapter, whatever the caller asked."""
        if self.adapter is None or adapted is None:
            return [False] * rows
        return [bool(a) for a in adapted]

    # ---- kept prompt states (prefix_cache.py) -------------------------------------------------
    def _versions(self, n: int, tables: Sequence[Any] | None) -> list[int]:
        if self.hooks is None:
            return [0] * n
        current = self.hooks.current
        return [int((current if t is None else t).version) for t in (tables or [None] * n)]

    @staticmethod
    def _scopes(n: int, tables: Sequence[Any] | None) -> list[frozenset[str] | None]:
        return [None if t is None else _table_scope(t) for t in (tables or [None] * n)]

    def cached_prefixes(
        self,
        prompts: Sequence[Sequence[int]],
        hooks_enabled: Sequence[bool],
        tables: Sequence[Any] | None = None,
        adapted: Sequence[bool] | None = None,
    ) -> list[PrefixEntry | None]:
        """The kept state of each prompt under its row's hook table (None: the current one), or None."""
        if not self.prefix_cache.enabled:
            return [None] * len(prompts)
        versions = self._versions(len(prompts), tables)
        scopes = self._scopes(len(prompts), tables)
        flags = self._adapted(adapted, len(prompts))
        return [
            self.prefix_cache.get(prefix_key(version, use, list(p), a, sc))
            for p, use, version, a, sc in zip(prompts, hooks_enabled, versions, flags, scopes, strict=True)
        ]

    def prefill_from_cache(self, entries: Sequence[PrefixEntry]) -> tuple[ForwardOutput, KVState]:
        """What `prefill` of these entries' prompts returns, without a forward: their kept caches merged
        into one left-padded cache (copies: a kept entry never changes)."""
        width = max(e.length for e in entries)

        def left_pad(t: torch.Tensor) -> torch.Tensor:
            return pad_columns_left(t, width)

        kv = [
            (
                torch.cat([left_pad(e.kv[layer][0]) for e in entries]),
                torch.cat([left_pad(e.kv[layer][1]) for e in entries]),
            )
            for layer in range(len(entries[0].kv))
        ]
        layers = set.intersection(*(set(e.hook_keys) for e in entries))
        keys = {i: torch.stack([e.hook_keys[i] for e in entries]) for i in sorted(layers)}
        out = ForwardOutput(
            torch.stack([e.logits for e in entries]),
            [dict(e.fires) for e in entries],
            [e.fired_tokens for e in entries],
            entries[0].edit_version,
        )
        return out, KVState(_cache_from(self.config, kv), [e.length for e in entries], keys)

    def _keep_prefixes(
        self,
        cache: DynamicCache,
        next_logits: torch.Tensor,
        last_keys: dict[int, torch.Tensor],
        prompts: Sequence[Sequence[int]],
        hooks_enabled: Sequence[bool],
        starts: Sequence[int],
        fires: list[dict[str, float]],
        fired: list[int],
        versions: Sequence[int],
        adapted: Sequence[bool] | None = None,
        scopes: Sequence[frozenset[str] | None] | None = None,
    ) -> None:
        """Keep each row's prompt state: its columns [starts[row], starts[row] + len(prompt)) of `cache`,
        the logits and gate keys after its last prompt token, and the fires over its prompt."""
        layers = _layer_tensors(cache)
        for row, prompt in enumerate(prompts):
            lo, hi = starts[row], starts[row] + len(prompt)
            kv = [(k[row : row + 1, :, lo:hi].clone(), v[row : row + 1, :, lo:hi].clone()) for k, v in layers]
            entry = PrefixEntry(
                kv,
                next_logits[row].clone(),
                {i: t[row].clone() for i, t in last_keys.items()},
                fires[row],
                fired[row],
                versions[row],
            )
            key = prefix_key(versions[row], hooks_enabled[row], list(prompt), bool(adapted and adapted[row]),
                             scopes[row] if scopes else None)
            self.prefix_cache.put(key, entry)

    def decode(
        self,
        state: KVState,
        last_tokens: Sequence[int],
        hooks_enabled: Sequence[bool],
        tables: Sequence[Any] | None = None,
        adapted: Sequence[bool] | None = None,
    ) -> ForwardOutput:
        """One new token per row; `state` grows by one column and every length by one. Mask and positions
        are built on the device from lengths kept there: the step copies only the new token ids over."""
        width = state.width
        lengths = state.device_lengths(self.device)
        columns = torch.arange(width + 1, device=self.device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()  # the new column is real for every row
        with (
            self._hook_scope(hooks_enabled, state.lengths, state.hook_keys, tables) as (rec, versions),
            self._adapter_scope(self._adapted(adapted, len(last_tokens))),
        ):
            out = self._forward(
                input_ids=torch.tensor(list(last_tokens), dtype=torch.long)[:, None].to(self.device),
                attention_mask=mask,
                position_ids=lengths[:, None],
                past_key_values=state.cache,
                use_cache=True,
            )
        state.cache = out.past_key_values
        state.lengths = [n + 1 for n in state.lengths]
        state.advance_device_lengths()
        state.hook_keys = {} if rec is None else dict(rec.last_keys)
        logits = out.logits[:, -1, :].float()
        rows = len(last_tokens)
        if rec is not None and rec.pending:  # fetched with the sampled ids (ForwardOutput.host_tokens)
            return ForwardOutput(logits, [{} for _ in range(rows)], [0] * rows, max(versions), pending=rec)
        fires, fired = self._collect(rec, rows)
        return ForwardOutput(logits, fires, fired, max(versions))

    def score(
        self, prompt_ids: Sequence[int], continuation_ids: Sequence[int], use_hooks: bool, table: Any = None
    ) -> ScoreOutput:
        """Teacher forcing: one forward over prompt + continuation."""
        return self.score_batch([(prompt_ids, continuation_ids, use_hooks, table)])[0]

    def score_batch(self, jobs: Sequence[tuple[Any, ...]]) -> list[ScoreOutput]:
        """Teacher forcing for several (prompt, continuation, use_hooks[, hook table]) at once: one
        left-padded forward, so every row's continuation ends in the last column and one `logits_to_keep`
        covers them all."""
        jobs = [(j[0], j[1], j[2], j[3] if len(j) > 3 else None) for j in jobs]
        seqs = [list(p) + list(c) for p, c, _, _ in jobs]
        n_cont = [len(c) for _, c, _, _ in jobs]
        batch = left_padded(seqs, self.pad_id)
        input_ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
        pads = batch.pads
        width = input_ids.shape[1]
        keep = max(n_cont) + 1  # the positions predicting each continuation token (and the last)
        keeping = self.prefix_cache.enabled  # the prompts' states, for a generation from the same prompt
        tables, enabled = [t for _, _, _, t in jobs], [u for _, _, u, _ in jobs]
        with self._hook_scope(enabled, [-p for p in pads], None, tables) as (rec, versions):
            kwargs: dict[str, object] = {}
            if len(seqs) > 1:  # a lone row needs no mask: the plain causal forward, as before batching
                kwargs = {"attention_mask": mask.to(self.device), "position_ids": positions.to(self.device)}
            if keeping:
                kwargs |= {"past_key_values": growing_cache(), "use_cache": True}
                if rec is not None:
                    rec.key_columns = [width - n - 1 for n in n_cont]
            else:
                kwargs["use_cache"] = False
            out = self._forward(input_ids=input_ids.to(self.device), logits_to_keep=keep, **kwargs)
        fires, _ = self._collect(rec, len(seqs))
        if keeping:
            prompts = [list(p) for p, _, _, _ in jobs]
            prompt_fires, prompt_fired = self._collect(rec, len(seqs), [len(p) for p in prompts])
            next_logits = torch.stack(
                [out.logits[row, keep - 1 - n].float() for row, n in enumerate(n_cont)]
            )
            self._keep_prefixes(
                out.past_key_values,
                next_logits,
                {} if rec is None else dict(rec.column_keys),
                prompts,
                [u for _, _, u, _ in jobs],
                pads,
                prompt_fires,
                prompt_fired,
                versions,
            )
        results = []
        for row, n in enumerate(n_cont):
            logprobs = out.logits[row, keep - 1 - n : keep - 1, :].float().log_softmax(dim=-1)
            target = torch.tensor(list(jobs[row][1]), dtype=torch.long, device=logprobs.device)
            picked = logprobs.gather(1, target[:, None]).squeeze(1)
            argmax = logprobs.argmax(dim=-1)
            greedy = (argmax == target).tolist()
            results.append(ScoreOutput(picked.tolist(), greedy, versions[row], fires[row], argmax.tolist()))
        return results
