"""Hook tables: the immutable, stacked snapshot of every active edit's entries that the hook layers read
(hooks/layer.py). One `LayerTable` per hooked layer holds unit keys, values, thresholds, the optional
previous-token conditions and, for large tables on a CPU, a bfloat16 or int8 copy of the keys for the
decode prefilter. Publishing a new table is a reference swap; nothing here runs a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_NAMESPACE",
    "NO_PREV_CONDITION",
    "PREFILTER_MAX_TOKENS",
    "PREFILTER_MIN_ENTRIES",
    "PREFILTER_TOP_K",
    "PREV_CHECK_TOP_K",
    "HookEntry",
    "Prefilter",
    "HookTable",
    "LayerTable",
    "native_bfloat16",
    "quantize_keys",
]


# The namespace of an edit that names none, and of every edit logged before namespaces existed.
DEFAULT_NAMESPACE = "default"

# The condition that always holds (a cosine is never below -1): the value of entries without prev_key.
NO_PREV_CONDITION = -2.0


@dataclass(frozen=True, eq=False)  # tensor fields: compare by identity
class HookEntry:
    """One edit's memory at one layer."""

    edit_id: str
    layer: int
    key: torch.Tensor  # [d_ff] float32, unnormalised ROME k* (normalised when a table is built)
    value: torch.Tensor  # [d_model] residual delta added to the MLP output where the gate fires
    threshold: float  # cosine gate
    # Key of the token before the subject's last one, and its cosine gate; None: no such condition
    # (a one-token subject, whose previous token is context, not subject).
    prev_key: torch.Tensor | None = None
    prev_threshold: float = NO_PREV_CONDITION
    namespace: str = DEFAULT_NAMESPACE  # requests see this entry only when they name its namespace

    def __post_init__(self) -> None:
        if (self.prev_key is None) != (self.prev_threshold == NO_PREV_CONDITION):
            raise ValueError("prev_key and prev_threshold come together")

    def with_id(self, edit_id: str) -> HookEntry:
        return replace(self, edit_id=edit_id)


# How many of a token's best keys are checked for their previous-token condition. An entry outside them
# does not fire at that token: a near-tie of more than this many edits, never a fire the gate refuses.
PREV_CHECK_TOP_K = 8

# Prefilter for large tables. The exact gate reads every key (N x d_ff float32: 61 MB at 10,000 SmolLM2
# edits) for every token, and on a CPU that read, not arithmetic, is its cost at decode. Above
# PREFILTER_MIN_ENTRIES a low-precision copy of the keys ranks them; the PREFILTER_TOP_K best are then
# scored exactly in float32 and the gate rule applies to those exact scores. The copy is bfloat16 in
# oneDNN's blocked layout on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), else int8 rows
# with per-row scales. At 10,000 SmolLM2 keys on the benchmark CPU, 16 tokens (a decode step) rank in
# 1.6 ms (bfloat16) or 6.6 ms (int8) against 10 ms for the exact matmul, and 480 tokens (a prefill) in
# 12 ms (bfloat16) against 94 ms: bfloat16 ranks every forward, int8 only forwards of at most
# PREFILTER_MAX_TOKENS tokens (its kernel is slower than the exact matmul on many). The approximate score
# is within ~5e-4 (bfloat16) or ~1e-3 (int8) of the exact cosine, so the decision can differ from the
# exact gate only when more than TOP_K keys lie within that distance of the best one: a near-tie between
# edits, never a fire where no key passes its threshold.
# Cached per table: row masks of batch compositions (which come and go), and namespace views (a few
# live at once); past the bound the cache starts over.
MASK_CACHE = 64
VIEW_CACHE = 256
PREFILTER_MIN_ENTRIES = 256
PREFILTER_MAX_TOKENS = 16
PREFILTER_TOP_K = 8


def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and per-row bf16 scales of unit keys, the layout `torch._weight_int8pack_mm` takes."""
    scales = keys.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(keys / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scales.to(torch.bfloat16)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and torch has oneDNN's packed
    linear: then the prefilter ranks in bfloat16, else in int8."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    ops = torch.ops.mkldnn
    return (native and torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


@dataclass(frozen=True, eq=False)
class Prefilter:
    """A low-precision copy of a layer's unit keys that ranks them for decode-sized inputs (PREFILTER_*):
    bfloat16 keys in oneDNN's blocked layout (`packed`), or int8 rows and bf16 per-row scales."""

    int8: tuple[torch.Tensor, torch.Tensor] | None = None
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, keys: torch.Tensor, bfloat16: bool | None = None) -> Prefilter:
        """The prefilter of unit keys [N, d] (`bfloat16`: None = what this CPU does best)."""
        if bfloat16 if bfloat16 is not None else native_bfloat16():
            return cls(packed=torch.ops.mkldnn._reorder_linear_weight(keys.to(torch.bfloat16).contiguous()))
        return cls(int8=quantize_keys(keys))

    def ranks(self, tokens: int) -> bool:
        """Whether it ranks a forward of `tokens` tokens: bfloat16 always (4-8x faster than the exact
        float32 matmul at any size), int8 decode-sized inputs only (PREFILTER_MAX_TOKENS)."""
        return self.packed is not None or tokens <= PREFILTER_MAX_TOKENS

    def scores(self, unit: torch.Tensor) -> torch.Tensor:
        """Approximate cosines [tokens, N] of unit rows against every key."""
        query = unit.to(torch.bfloat16).contiguous()
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(query, self.packed, None, "none", [], "")
        assert self.int8 is not None
        return torch._weight_int8pack_mm(query, *self.int8)

    def select(self, rows: torch.Tensor, keys: torch.Tensor) -> Prefilter:
        """The prefilter of `keys` (this one's rows `rows`)."""
        if self.int8 is None:
            return Prefilter.of(keys, bfloat16=True)
        return Prefilter(int8=(self.int8[0].index_select(0, rows), self.int8[1].index_select(0, rows)))

    def extended(self, other_keys: torch.Tensor, keys: torch.Tensor) -> Prefilter:
        """The prefilter of `keys`: this one's rows then `other_keys`."""
        if self.int8 is None:
            return Prefilter.of(keys, bfloat16=True)
        # per-row scales: quantizing only the new rows gives the same bytes as quantizing all
        q, scales = quantize_keys(other_keys.to(self.int8[0].device))
        return Prefilter(int8=(torch.cat([self.int8[0], q]), torch.cat([self.int8[1], scales])))

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return self.packed.numel() * self.packed.element_size()
        assert self.int8 is not None
        return sum(t.numel() * t.element_size() for t in self.int8)


@dataclass(frozen=True, eq=False)  # tensor fields: compare by identity
class LayerTable:
    """The stacked entries of one layer: row i of every field belongs to the same entry."""

    keys: torch.Tensor  # [N, d_ff] float32, unit rows (float32 even for half models: thresholds are tight)
    values: torch.Tensor  # [N, d_model] in the model dtype
    thresholds: torch.Tensor  # [N] float32
    ids: tuple[str, ...]
    # the decode prefilter's low-precision keys; filled in for large CPU tables
    prefilter: Prefilter | None = None
    # [N, d_ff] unit rows (zero where an entry has no condition) and [N] thresholds (NO_PREV_CONDITION
    # there); both None when no entry of the layer has a previous-token condition
    prev_keys: torch.Tensor | None = None
    prev_thresholds: torch.Tensor | None = None
    # Each entry's namespace; None: every entry is in DEFAULT_NAMESPACE.
    namespaces: tuple[str, ...] | None = None
    # Boolean masks over the entries, made on first use and kept with this immutable table: per namespace
    # set [N], and per batch composition [rows, N] (see row_mask).
    _masks: dict[object, torch.Tensor | None] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prefilter is None and self.wants_prefilter(len(self.ids), self.keys.device):
            object.__setattr__(self, "prefilter", Prefilter.of(self.keys))
        if self.namespaces is not None:
            if len(self.namespaces) != len(self.ids):
                raise ValueError("one namespace per entry")
            if all(ns == DEFAULT_NAMESPACE for ns in self.namespaces):
                object.__setattr__(self, "namespaces", None)

    def namespace_of(self, row: int) -> str:
        return DEFAULT_NAMESPACE if self.namespaces is None else self.namespaces[row]

    @property
    def namespace_set(self) -> frozenset[str]:
        """The namespaces of this layer's entries (made once: every request of a version asks)."""
        found = self._masks.get("namespace_set")
        if found is None:
            found = frozenset(self.namespaces or (DEFAULT_NAMESPACE,))
            self._masks["namespace_set"] = found  # type: ignore[assignment]
        return found  # type: ignore[return-value]

    def entry_mask(self, allowed: frozenset[str] | None) -> torch.Tensor | None:
        """[N] bool: the entries a request naming `allowed` may fire; None when that is every entry."""
        if allowed is None or self.namespace_set <= allowed:
            return None
        if allowed not in self._masks:
            names = self.namespaces or (DEFAULT_NAMESPACE,) * len(self.ids)
            self._masks[allowed] = torch.tensor(
                [ns in allowed for ns in names], dtype=torch.bool, device=self.keys.device
            )
        return self._masks[allowed]

    def row_mask(self, scopes: Sequence[frozenset[str] | None] | None) -> torch.Tensor | None:
        """[rows, N] bool: which entries each row of a forward may fire (rows of a batch may name different
        namespaces, and all are gated by one matmul); None when every row may fire every entry."""
        if scopes is None:
            return None
        key = ("rows", tuple(scopes))
        if key not in self._masks:
            masks = [self.entry_mask(s) for s in scopes]
            if all(m is None for m in masks):
                out = None
            else:
                full = torch.ones(len(self.ids), dtype=torch.bool, device=self.keys.device)
                out = torch.stack([full if m is None else m for m in masks])
            if len(self._masks) > MASK_CACHE:
                self._masks = {k: v for k, v in self._masks.items() if not isinstance(k, tuple)}
            self._masks[key] = out
        return self._masks[key]

    @staticmethod
    def wants_prefilter(n: int, device: torch.device) -> bool:
        # int8 x bf16 matmul is a CPU kernel here; GPUs read 61 MB in well under a millisecond anyway.
        return n >= PREFILTER_MIN_ENTRIES and device.type == "cpu"

    def __len__(self) -> int:
        return len(self.ids)

    def _prev(self) -> tuple[torch.Tensor, torch.Tensor]:
        """prev_keys and prev_thresholds, materialised (zeros / NO_PREV_CONDITION) when absent."""
        if self.prev_keys is not None and self.prev_thresholds is not None:
            return self.prev_keys, self.prev_thresholds
        return torch.zeros_like(self.keys), torch.full_like(self.thresholds, NO_PREV_CONDITION)

    def select(self, rows: torch.Tensor) -> LayerTable:
        """The rows `rows` (long indices), in that order."""
        rows = rows.to(self.keys.device)
        keys = self.keys.index_select(0, rows)
        pre = None
        if self.prefilter is not None and self.wants_prefilter(len(rows), self.keys.device):
            pre = self.prefilter.select(rows, keys)
        prev = None
        if self.prev_keys is not None and self.prev_thresholds is not None:
            prev = (self.prev_keys.index_select(0, rows), self.prev_thresholds.index_select(0, rows))
        return LayerTable(
            keys=keys,
            values=self.values.index_select(0, rows.to(self.values.device)),
            thresholds=self.thresholds.index_select(0, rows.to(self.thresholds.device)),
            ids=tuple(self.ids[int(n)] for n in rows.tolist()),
            prefilter=pre,
            prev_keys=None if prev is None else prev[0],
            prev_thresholds=None if prev is None else prev[1],
            namespaces=None if self.namespaces is None else tuple(self.namespaces[n] for n in rows.tolist()),
        )

    def extended(self, other: LayerTable) -> LayerTable:
        keys = torch.cat([self.keys, other.keys.to(self.keys.device)])
        pre = None
        if self.prefilter is not None and self.wants_prefilter(len(keys), keys.device):
            pre = self.prefilter.extended(other.keys, keys)
        prev_keys = prev_thresholds = None
        if self.prev_keys is not None or other.prev_keys is not None:
            (pk1, pt1), (pk2, pt2) = self._prev(), other._prev()
            prev_keys = torch.cat([pk1, pk2.to(pk1.device)])
            prev_thresholds = torch.cat([pt1, pt2.to(pt1.device)])
        return LayerTable(
            keys=keys,
            values=torch.cat([self.values, other.values.to(self.values.device, self.values.dtype)]),
            thresholds=torch.cat([self.thresholds, other.thresholds.to(self.thresholds.device)]),
            ids=self.ids + other.ids,
            prefilter=pre,
            prev_keys=prev_keys,
            prev_thresholds=prev_thresholds,
            namespaces=None if self.namespaces is None and other.namespaces is None else (
                tuple(self.namespace_of(n) for n in range(len(self)))
                + tuple(other.namespace_of(n) for n in range(len(other)))
            ),
        )


def _stack_layer(entries: Sequence[HookEntry], device: torch.device, dtype: torch.dtype) -> LayerTable:
    # One stack + one normalise over all rows: 10k entries build in milliseconds.
    keys = torch.stack([e.key.detach().reshape(-1) for e in entries]).to(device=device, dtype=torch.float32)
    values = torch.stack([e.value.detach().reshape(-1) for e in entries]).to(device=device, dtype=dtype)
    thresholds = torch.tensor([float(e.threshold) for e in entries], dtype=torch.float32, device=device)
    prev_keys = prev_thresholds = None
    if any(e.prev_key is not None for e in entries):
        zero = torch.zeros_like(keys[0])
        prev_keys = F.normalize(
            torch.stack(
                [zero if e.prev_key is None else e.prev_key.detach().reshape(-1).to(zero) for e in entries]
            ),
            dim=-1,
        )
        prev_thresholds = torch.tensor(
            [float(e.prev_threshold) for e in entries], dtype=torch.float32, device=device
        )
    return LayerTable(
        F.normalize(keys, dim=-1),
        values,
        thresholds,
        tuple(e.edit_id for e in entries),
        prev_keys=prev_keys,
        prev_thresholds=prev_thresholds,
        namespaces=tuple(e.namespace for e in entries),
    )


class HookTable:
    """Immutable snapshot of every active entry, grouped by layer. Build with `HookTable.build`."""

    def __init__(
        self,
        layers: dict[int, LayerTable],
        *,
        version: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._layers = {i: t for i, t in layers.items() if len(t)}
        self.version = int(version)
        self.device = torch.device(device)
        self.dtype = dtype
        seen: dict[str, None] = {}
        for i in sorted(self._layers):
            seen.update(dict.fromkeys(self._layers[i].ids))
        self._edit_ids = tuple(seen)
        # A scoped view (see `scoped`) shares `base`'s tensors; the gate masks entries outside `scope`.
        self.base: HookTable = self
        self.scope: frozenset[str] | None = None
        self._views: dict[frozenset[str], HookTable] = {}
        self._namespaces: frozenset[str] | None = None

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces that have entries in this table."""
        if self._namespaces is None:
            out: set[str] = set()
            for t in self._layers.values():
                out |= t.namespace_set
            self._namespaces = frozenset(out)
        return self._namespaces

    def scoped(self, namespaces: frozenset[str] | None) -> HookTable:
        """This table as a request naming `namespaces` sees it: the same tensors, with the gate masking
        the entries of every other namespace. Itself when the request names every namespace the table
        holds (no mask, no cost); one view object per namespace set, so the engine can group rows."""
        base = self.base
        if namespaces is None or base.namespaces <= namespaces:
            return base
        view = base._views.get(namespaces)
        if view is None:
            view = HookTable(base._layers, version=base.version, device=base.device, dtype=base.dtype)
            view.base, view.scope = base, namespaces
            if len(base._views) > VIEW_CACHE:
                base._views.clear()
            base._views[namespaces] = view
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the table holds (keys, values, thresholds, prefilter, conditions)."""
        total = 0
        for t in self._layers.values():
            parts = [t.keys, t.values, t.thresholds, t.prev_keys, t.prev_thresholds]
            total += sum(x.numel() * x.element_size() for x in parts if x is not None)
            total += t.prefilter.nbytes if t.prefilter is not None else 0
        return total

    def entry_nbytes(self, entry: HookEntry) -> int:
        """An upper bound of what `entry` adds to a table like this one (as `nbytes` counts it)."""
        d_ff, d_model = entry.key.shape[-1], entry.value.shape[-1]
        return 3 * 4 * d_ff + d_model * torch.empty(0, dtype=self.dtype).element_size() + 2 * d_ff + 16

    @classmethod
    def build(
        cls,
        entries: Sequence[HookEntry],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        version: int = 0,
    ) -> HookTable:
        dev = torch.device(device)
        by_layer: dict[int, list[HookEntry]] = {}
        for e in entries:
            by_layer.setdefault(int(e.layer), []).append(e)
        layers = {i: _stack_layer(es, dev, dtype) for i, es in by_layer.items()}
        return cls(layers, version=version, device=dev, dtype=dtype)

    @classmethod
    def empty(
        cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, version: int = 0
    ) -> HookTable:
        return cls({}, version=version, device=device, dtype=dtype)

    def extended(self, entries: Sequence[HookEntry], *, version: int | None = None) -> HookTable:
        """A new table with `entries` appended after each layer's existing rows (their indices kept)."""
        add = HookTable.build(entries, self.device, self.dtype)
        layers = dict(self._layers)
        for i, t in add._layers.items():
            layers[i] = layers[i].extended(t) if i in layers else t
        return HookTable(
            layers, version=self.version if version is None else version, device=self.device, dtype=self.dtype
        )

    def layer(self, i: int) -> LayerTable | None:
        return self._layers.get(i)

    @property
    def layers(self) -> dict[int, LayerTable]:
        return dict(self._layers)

    @property
    def edit_ids(self) -> tuple[str, ...]:
        return self._edit_ids

    @property
    def num_entries(self) -> int:
        return sum(len(t) for t in self._layers.values())

    def __len__(self) -> int:
        """Number of distinct edits (an edit has one entry per hooked layer)."""
        return len(self._edit_ids)

    def __repr__(self) -> str:
        return f"HookTable(version={self.version}, edits={len(self)}, layers={sorted(self._layers)})"
