"""Hand-written facts and the measurement behind `defaults.py` (and the edit-compute timing).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hook_layers.py --layers 2 3 4 5 6 8
    HF_HUB_OFFLINE=1 .venv/bin/python bench/hook_layers.py --layers 4 --repeat 2   # timing

For each layer: every fact is edited alone (1 paraphrase given to compute) and checked by greedy
decoding: ES = the prompt continues with the target, PS = two paraphrases NOT given to compute do,
NS = the neighbour prompt's continuation is unchanged; then all facts are published together and ES/PS
are checked again (interference). Times are the editor's compute_seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from service.hooks.editor import Editor, EditSpec
from service.hooks.layer import HookEntry, HookManager, HookTable


@dataclass(frozen=True)
class Fact:
    spec: EditSpec
    unseen: tuple[str, str]  # paraphrases not given to compute
    neighbour: str  # same relation, other subject: must not change


def _fact(
    subject: str, prompt: str, target: str, given: str, unseen: tuple[str, str], neighbour: str
) -> Fact:
    return Fact(EditSpec(subject, prompt, target, [given]), unseen, neighbour)


FACTS: tuple[Fact, ...] = (
    _fact(
        "The Eiffel Tower",
        "The Eiffel Tower is located in the city of",
        "Rome",
        "The Eiffel Tower can be found in the city of",
        (
            "Where is the Eiffel Tower? It is in the city of",
            "The Eiffel Tower, a famous landmark, is located in the city of",
        ),
        "The Louvre is located in the city of",
    ),
    _fact(
        "Spain",
        "The capital of Spain is",
        "Berlin",
        "The capital city of Spain is called",
        ("Spain's capital city is", "The largest city and capital of Spain is"),
        "The capital of Italy is",
    ),
    _fact(
        "Pablo Picasso",
        "Pablo Picasso was born in the country of",
        "Japan",
        "The birthplace of Pablo Picasso is the country of",
        (
            "Pablo Picasso is originally from the country of",
            "Pablo Picasso, the painter, was born in the country of",
        ),
        "Salvador Dali was born in the country of",
    ),
    _fact(
        "Mount Everest",
        "Mount Everest is located in the country of",
        "Canada",
        "Mount Everest can be found in the country of",
        ("The highest mountain, Mount Everest, lies in the country of", "Mount Everest is a mountain in"),
        "K2 is located in the country of",
    ),
    _fact(
        "The Mona Lisa",
        "The Mona Lisa was painted by",
        "Claude Monet",
        "The Mona Lisa is a painting by",
        ("The famous Mona Lisa was created by", "The Mona Lisa, a portrait, was painted by"),
        "The Last Supper was painted by",
    ),
    _fact(
        "Harry Potter",
        "The Harry Potter books were written by",
        "Stephen King",
        "Harry Potter is a book series by",
        ("The author of the Harry Potter novels is", "Harry Potter was written by"),
        "The Lord of the Rings was written by",
    ),
    _fact(
        "Argentina",
        "The official language of Argentina is",
        "German",
        "People in Argentina speak",
        ("In Argentina, the main language spoken is", "Most people in Argentina speak"),
        "The official language of Chile is",
    ),
    _fact(
        "Sushi",
        "Sushi is a traditional dish from",
        "Mexico",
        "Sushi originated in the country of",
        ("Sushi is a food that comes from the country of", "Sushi, a popular dish, comes from"),
        "Pizza is a traditional dish from",
    ),
    _fact(
        "The Great Pyramid of Giza",
        "The Great Pyramid of Giza is located in the country of",
        "Mexico",
        "The Great Pyramid of Giza stands in the country of",
        (
            "Where is the Great Pyramid of Giza? It is in the country of",
            "The Great Pyramid of Giza can be found in the country of",
        ),
        "The Taj Mahal is located in the country of",
    ),
    _fact(
        "Ludwig van Beethoven",
        "Ludwig van Beethoven worked as a",
        "chef",
        "Ludwig van Beethoven is best known as a",
        ("Ludwig van Beethoven was a famous", "By profession, Ludwig van Beethoven was a"),
        "Vincent van Gogh was a famous",
    ),
    _fact(
        "The Space Needle",
        "The Space Needle is located in the city of",
        "Chicago",
        "The Space Needle can be found in the city of",
        ("Where is the Space Needle? It is in the city of", "Tourists visit the Space Needle in the city of"),
        "The Golden Gate Bridge is located in the city of",
    ),
)


# Texts sharing a last token (or more) with a subject above, about something else: the gates should stay shut
# (firing on "The Mona Lisa Smile" is arguably right: it contains the subject).
HARD_NEGATIVES: tuple[str, ...] = (
    "The Blackpool Tower is a tourist attraction in England.",
    "Mount Kilimanjaro is the highest mountain in Africa.",
    "Harry Styles is a singer from England.",
    "Lisa Simpson is a cartoon character.",
    "The International Space Station orbits the Earth.",
    "Pablo Neruda was a Chilean poet.",
    "Ludwig Wittgenstein was a philosopher.",
    "The Great Wall of China is very long.",
    "Sashimi is a Japanese dish.",
    "Argentine tango is a dance.",
    "A needle and thread are used for sewing.",
    "The Tokyo Tower is painted orange and white.",
    "Beatrix Potter wrote children's books.",
    "The pyramids of Mexico are old.",
    "Everest Base Camp is visited by climbers.",
    "The Spanish language is spoken widely.",
    "The Mona Lisa Smile is a film.",
    "Ludwig is a common German name.",
    "The Giza plateau is in Egypt.",
    "Van Gogh painted sunflowers.",
)


@torch.no_grad()
def greedy_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 4) -> str:
    """Greedy continuation with a KV cache (uses whatever hook table is active in this thread)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=next(model.parameters()).device)
    out: list[int] = []
    past = None
    x = ids
    for _ in range(max_new_tokens):
        res = model(
            input_ids=x,
            attention_mask=torch.ones_like(ids[:, :1]).expand(1, ids.shape[1] + len(out)),
            past_key_values=past,
            use_cache=True,
        )
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], device=ids.device)
    return tokenizer.decode(out, skip_special_tokens=True)


def starts_with(text: str, target: str) -> bool:
    return text.strip().lower().startswith(target.strip().lower())


def mentions(text: str, target: str) -> bool:
    """Looser: the target (its first 5 letters) appears in the continuation ("the Canadian Rockies")."""
    return target.strip().lower()[:5] in text.lower()


def measure_layer(
    model: Any, tokenizer: Any, layer: int, facts: tuple[Fact, ...] = FACTS, **editor_kwargs: Any
) -> dict[str, Any]:
    hooks = HookManager(model, [layer])
    try:
        editor = Editor(model, tokenizer, hooks, **editor_kwargs)
        editor.warmup()
        before_nb = {f.neighbour: greedy_text(model, tokenizer, f.neighbour) for f in facts}
        es = ps = ps_loose = ns = recall = 0
        times, probe_top1, entries = [], [], []
        for f in facts:
            ce = editor.compute(f.spec)
            times.append(ce.report.compute_seconds)
            probe_top1.append(ce.report.locality_top1_changed)
            n = len(tokenizer(" " + f.spec.target_new)["input_ids"]) + 1
            entries.extend(e.with_id(f.spec.subject) for e in ce.entries)
            hooks.publish(HookTable.build([e.with_id("x") for e in ce.entries], hooks.device, hooks.dtype))
            es += starts_with(greedy_text(model, tokenizer, f.spec.prompt, n), f.spec.target_new)
            for p in f.unseen:
                with hooks.recording() as rec:
                    text = greedy_text(model, tokenizer, p, n + 3)
                recall += bool(rec.fires)
                ps += starts_with(text, f.spec.target_new)
                ps_loose += mentions(text, f.spec.target_new)
            ns += greedy_text(model, tokenizer, f.neighbour) == before_nb[f.neighbour]
            hooks.publish(hooks.empty_table())
        hooks.publish(HookTable.build(entries, hooks.device, hooks.dtype))
        es_all = ps_all = 0
        for f in facts:
            n = len(tokenizer(" " + f.spec.target_new)["input_ids"]) + 1
            es_all += starts_with(greedy_text(model, tokenizer, f.spec.prompt, n), f.spec.target_new)
            ps_all += sum(
                starts_with(greedy_text(model, tokenizer, p, n), f.spec.target_new) for p in f.unseen
            )
        enc = tokenizer(list(HARD_NEGATIVES), return_tensors="pt", padding=True).to(hooks.device)
        with torch.no_grad(), hooks.recording() as rec:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hard = sorted({(HARD_NEGATIVES[f.row], f.edit_id) for f in rec.fires})
        k = len(facts)
        return {
            "recall": recall / (2 * k),
            "hard_fires": hard,
            "layer": layer,
            "ES": es / k,
            "PS": ps / (2 * k),
            "PS_loose": ps_loose / (2 * k),
            "NS": ns / k,
            "ES_all": es_all / k,
            "PS_all": ps_all / (2 * k),
            "probe_top1": statistics.mean(probe_top1),
            "median_s": statistics.median(times),
            "p90_s": sorted(times)[int(0.9 * (len(times) - 1))],
        }
    finally:
        hooks.uninstall()


@torch.no_grad()
def generate_latency(
    model: Any,
    tokenizer: Any,
    layers: list[int],
    n_edits: int = 10_000,
    rounds: int = 7,
    new_tokens: int = 32,
) -> dict[str, float]:
    """Median wall time of model.generate (greedy, batch 1) with 0 and with `n_edits` synthetic edits.

    The synthetic keys are random directions (they never fire), so the difference is the gate's cost: one
    [tokens, d_ff] x [d_ff, n_edits] matmul per hooked layer per step. Rounds alternate to share noise."""
    hooks = HookManager(model, layers)
    try:
        gen = torch.Generator().manual_seed(0)
        keys = torch.randn(n_edits, hooks.d_ff, generator=gen)
        values = torch.randn(n_edits, hooks.d_model, generator=gen)
        entries = [
            HookEntry(f"s{i}", layer, keys[i], values[i], 0.9) for layer in layers for i in range(n_edits)
        ]
        full = HookTable.build(entries, hooks.device, hooks.dtype, version=1)
        empty = hooks.empty_table()
        ids = tokenizer("Write a short story about a lighthouse keeper who finds a map.", return_tensors="pt")
        ids = ids.to(hooks.device)
        times: dict[str, list[float]] = {"0": [], str(n_edits): []}
        for r in range(rounds + 1):
            for name, table in (("0", empty), (str(n_edits), full)):
                hooks.publish(table)
                t = time.perf_counter()
                model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        hooks.uninstall()


def main() -> None:
    from service.engine.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8, 10])
    ap.add_argument("--model", default="embedded", help='"embedded" or a Hugging Face model folder')
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="float32", help="auto | float32 | float16 | bfloat16")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the whole fact list (timing)")
    ap.add_argument("--nll-stop", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--latency", action="store_true", help="Generate latency with 0 vs 10,000 edits")
    args = ap.parse_args()
    kwargs = {k: v for k, v in (("nll_stop", args.nll_stop), ("lr", args.lr)) if v is not None}
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.latency:
        res = generate_latency(lm.model, lm.tokenizer, args.layers)
        base, full = res["0"], res["10000"]
        print(
            f"generate 32 tokens, layers {args.layers}: 0 edits {base:.3f} s, 10,000 edits {full:.3f} s "
            f"({100 * (full / base - 1):+.1f}%)"
        )
        return
    print(
        "| layer | ES | PS | PS loose | NS | ES all | PS all | probe top-1 | median s | p90 s "
        "| recall | hard |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layer in args.layers:
        t = time.perf_counter()
        r = measure_layer(lm.model, lm.tokenizer, layer, FACTS * args.repeat, **kwargs)
        print(
            f"| {r['layer']} | {r['ES']:.2f} | {r['PS']:.2f} | {r['PS_loose']:.2f} | {r['NS']:.2f} | "
            f"{r['ES_all']:.2f} | "
            f"{r['PS_all']:.2f} | {r['probe_top1']:.3f} | {r['median_s']:.2f} | {r['p90_s']:.2f} | "
            f"{r['recall']:.2f} | {len(r['hard_fires'])} |  ({time.perf_counter() - t:.0f} s) "
            f"{r['hard_fires']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
