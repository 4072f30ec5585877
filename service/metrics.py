"""Prometheus metrics (prometheus-client only: importable from every layer).

Latency buckets follow vLLM's (vllm/engine/metrics.py) so dashboards built for vLLM read ours.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, Info

REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
EDIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)

REQUESTS = Counter("editserve_requests", "RPCs answered, by method and status code", ["rpc", "code"])
REQUEST_DURATION = Histogram(
    "editserve_request_duration_seconds", "RPC wall time", ["rpc"], buckets=REQUEST_LATENCY_BUCKETS
)
TTFT = Histogram("editserve_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS)
ITL = Histogram("editserve_inter_token_latency_seconds", "Time between tokens", buckets=ITL_BUCKETS)
QUEUE_TIME = Histogram("editserve_queue_time_seconds", "Time waiting before prefill", buckets=TTFT_BUCKETS)
PROMPT_TOKENS = Counter("editserve_prompt_tokens", "Prompt tokens processed")
GENERATION_TOKENS = Counter("editserve_generation_tokens", "Tokens generated")
QUEUE_CAPACITY = Gauge(
    "editserve_queue_capacity", "Most requests that may wait for a batch slot (--max-queue)"
)
ADMISSION_WAITS = Counter(
    "editserve_admission_waits", "Prefills an idle engine held for a burst still arriving, by how the hold "
    "ended (arrived: none being routed and none new for --admission-gap-ms; full: the batch is full; "
    "timeout: --admission-wait-ms passed)", ["outcome"]
)
SPECULATIVE_PREFILLS = Counter(
    "editserve_speculative_prefills", "Generates queued with their plain prompt while the sentence encoder "
    "routed them, by outcome (kept: no descriptor in scope; discarded: queued again with descriptors)",
    ["outcome"],
)
RUNNING = Gauge("editserve_num_requests_running", "Sequences in the running batch")
WAITING = Gauge("editserve_num_requests_waiting", "Requests queued for admission")
BATCH_SIZE = Histogram("editserve_batch_size", "Rows per forward pass", buckets=BATCH_SIZE_BUCKETS)
PREFIX_CACHE_LOOKUPS = Counter(
    "editserve_prefix_cache_lookups", "Prefills that looked up a kept prompt state, by result", ["result"]
)
PREFIX_CACHE_BYTES = Gauge("editserve_prefix_cache_bytes", "Bytes of prompt KV states kept for reuse")
HOOK_TABLE_BYTES = Gauge(
    "editserve_hook_table_bytes", "Bytes of the published hook table (keys, values, gates) on its device"
)
MODEL_INFO = Info("editserve_model", "Served model")

EDITS_ACTIVE = Gauge("editserve_edits_active", "Active edits", ["path"])
EDIT_OPERATIONS = Counter("editserve_edit_operations", "Edit operations", ["op", "result"])
EDIT_COMPUTE = Histogram(
    "editserve_edit_compute_seconds", "Key/value computation per edit", buckets=EDIT_BUCKETS
)
QUALITY_GATE = Counter(
    "editserve_quality_gate",
    "Quality-gate verdicts on computed hook edits: passed, failed (refused), forced (failed, stored by "
    "force), dropped (a hook compiled from a descriptor failed; the descriptor alone is stored)",
    ["result"],
)
for _verdict in ("passed", "failed", "forced", "dropped"):  # zero from the start: rate() needs a series
    QUALITY_GATE.labels(result=_verdict)
HOOK_FIRES = Counter("editserve_hook_fires", "Tokens where a hook-layer edit fired")
EDIT_LOG_VERSION = Gauge("editserve_edit_log_version", "Edit-set version applied by this replica")
EDIT_LOG_SYNC_ERRORS = Counter(
    "editserve_edit_log_sync_errors", "Failed reads of a shared edit log by this replica's tailer"
)

SCOPE_SECONDS = Histogram(
    "editserve_scope_detection_seconds", "Request-level scope detection", buckets=FAST_BUCKETS
)
SCOPE_IN_SCOPE = Counter("editserve_scope_in_scope", "Requests with at least one in-scope descriptor")
RETRIEVAL_INDEX_SIZE = Gauge("editserve_retrieval_index_size", "Descriptors in the retrieval index")

# Per-namespace series. Namespaces are tenant-chosen, so their label values are capped: the first
# MAX_NAMESPACE_LABELS namespaces seen by this process keep their own, every later one is counted under
# "other" (a namespace never moves between the two while the process lives).
MAX_NAMESPACE_LABELS = 20
OTHER_NAMESPACE = "other"
NAMESPACE_EDITS_ACTIVE = Gauge(
    "editserve_namespace_edits_active", "Active edits per namespace (capped label set; the rest: other)",
    ["namespace"],
)
NAMESPACE_EDIT_OPERATIONS = Counter(
    "editserve_namespace_edit_operations",
    "Edit operations per namespace (capped label set; the rest: other), by operation and result",
    ["namespace", "op", "result"],
)
_namespace_labels: dict[str, str] = {}
_namespace_lock = threading.Lock()


def namespace_label(namespace: str) -> str:
    """The label value `namespace` is counted under (itself, or "other" past the cap)."""
    with _namespace_lock:
        label = _namespace_labels.get(namespace)
        if label is None:
            own = len(set(_namespace_labels.values()) - {OTHER_NAMESPACE}) < MAX_NAMESPACE_LABELS
            label = namespace if own and namespace != OTHER_NAMESPACE else OTHER_NAMESPACE
            _namespace_labels[namespace] = label
        return label


def count_namespace_operation(namespace: str, op: str, result: str) -> None:
    NAMESPACE_EDIT_OPERATIONS.labels(namespace=namespace_label(namespace), op=op, result=result).inc()


def set_namespace_gauge(active: dict[str, int]) -> None:
    """Set the active-edit gauge from per-namespace counts (namespaces past the cap are summed)."""
    totals: dict[str, int] = {}
    for namespace, n in active.items():
        label = namespace_label(namespace)
        totals[label] = totals.get(label, 0) + n
    with _namespace_lock:
        known = set(_namespace_labels.values())
    for label in known:  # a namespace whose edits were all rolled back reads 0, not its last value
        NAMESPACE_EDITS_ACTIVE.labels(namespace=label).set(totals.get(label, 0))
