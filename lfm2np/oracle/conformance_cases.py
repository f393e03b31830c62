"""The conformance pack's cases: its prompts, its decoding scenarios, and the reference outputs of each.

A case is a script of **steps** a backend plays on its own decoding state, one or several sequences:

- ``{"op": "feed", "seq": s, "ids": [...]}``: process these ids after what sequence ``s`` holds (a prefill, a
  chunk, one decoded token); its logits are one output, ``logits.<k>`` for the k-th feed of the case;
- ``{"op": "rollback", "seq": s, "n": n}``: forget the last ``n`` positions of sequence ``s`` (speculative
  decoding's rejected draft), as if they had never been fed;
- ``{"op": "batch", "feeds": [{"seq": s, "ids": [...]}, ...]}``: several sequences in one call (lengths may
  differ), one output per entry.

Decoded tokens are given (teacher forcing: the reference's greedy choices), so no sampling enters a case. The
reference of every feed is computed from scratch by one forward pass over its sequence as it stands after the
feed (never from a cache: a cached path's bugs must not enter the reference); a sequence after a rollback is a
new branch. For MoE models each feed also records its routing margins: per position the smallest, over the MoE
layers, of the gap between the k-th and the (k+1)-th expert's selection score relative to the layer's largest
score, taken as the minimum over the sequence so far; where it is within a tier, a correct backend may choose
other experts there and its later logits are not judged (a near-tie; docs/conformance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..io.prompts import Prompt
from ..schema import layer_steps
from .golden import golden_vectors
from .trace import record

#: decoded tokens given after the prompt in the decoding scenarios (teacher forcing)
CONTINUATION = 4
#: the tokenwise scenario feeds at most this many tokens one by one
TOKENWISE = 16

BUILTIN_PROMPTS = (
    Prompt("text", "text", text='The "for" statement is used to iterate over the elements of a sequence.'),
    Prompt("chat", "chat", messages=({"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": 'What is the "while" statement?'})),
    Prompt("tool", "chat", tools=({"name": "get_weather", "description": "The weather in a city now.",
                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}},),
           messages=({"role": "system", "content": "You answer with tools when one fits."},
                     {"role": "user", "content": "What is the weather in Paris?"},
                     {"role": "assistant", "content": '<|tool_call_start|>[get_weather(city="Paris")]'
                                                      '<|tool_call_end|>'},
                     {"role": "tool", "content": '{"temperature": 18, "sky": "clear"}'})),
)

#: what each kind of case proves (the manifest and docs/conformance.md say it to backend authors)
PROVES = {
    "oneshot": "the whole prompt in one call: the logits of every position (and the intermediates a backend can "
               "show: hidden states, mixer and FFN outputs, router scores and chosen experts)",
    "decode-tokenwise": "one token per call from the start: the conv window and the KV cache carried call to "
                        "call, RoPE positions advancing",
    "decode-chunked": "the prompt in three calls: a prefill continuing a state (the conv window across a chunk "
                      "boundary, transformers#42017)",
    "decode-second-prefill": "a prefill, decoded tokens, then a second multi-token prefill continuing the state "
                             "(a chat's next turn)",
    "decode-rollback": "a draft fed in one call, its last tokens rolled back, decoding resumed: the conv state "
                       "and KV cache restored to an earlier position (speculative decoding, vllm#44296)",
    "decode-batch": "sequences of different lengths in one call, then one token each: nothing shared between "
                    "sequences (llama.cpp#14670)",
    "operator": "one operator alone on the reference's inputs and weights: the kernel, without the model around it",
    "llama.cpp": "the files llama.cpp's model-conversion scripts compare: the last position's logits of one prompt",
}
SCENARIOS = ("decode-tokenwise", "decode-chunked", "decode-second-prefill", "decode-rollback", "decode-batch")

#: the values of the oneshot cases' traces: what backends can usually show (transformers' hidden states and module
#: outputs, llama.cpp's l_out-N, ffn_moe_* and result_norm)
USUAL_STEPS = ("", "conv.out_proj", "self_attn.out_proj", "feed_forward.output", "feed_forward.router_logits",
               "feed_forward.router_scores", "feed_forward.biased_scores", "feed_forward.selected_experts",
               "feed_forward.routing_weights")


@dataclass(frozen=True)
class Feed:
    """One feed of a script: its output's index, its sequence, its ids, where they start in the sequence, and
    the whole sequence after it."""

    index: int
    seq: int
    ids: tuple[int, ...]
    start: int
    sequence: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"output": f"logits.{self.index}", "seq": self.seq, "start": self.start, "length": len(self.ids),
                "ids": list(self.ids)}


def play(steps: list[dict[str, Any]], where: str = "case") -> list[Feed]:
    """The feeds of a script, each with its positions and its sequence as it stands after it; a malformed step
    (an unknown op, a rollback deeper than its sequence, ids that are not token ids) is an error naming it."""
    seqs: dict[int, list[int]] = {}
    out: list[Feed] = []

    def feed(entry: Any, n: int) -> None:
        if not isinstance(entry, dict) or type(entry.get("seq")) is not int or not isinstance(entry.get("ids"), list) \
                or not entry["ids"] or any(type(i) is not int or i < 0 for i in entry["ids"]):
            raise Lfm2npError(f"{where}: step {n} feeds no valid ids (a seq number and a non-empty list of ids)")
        held = seqs.setdefault(entry["seq"], [])
        start = len(held)
        held.extend(entry["ids"])
        out.append(Feed(len(out), entry["seq"], tuple(entry["ids"]), start, tuple(held)))

    if not isinstance(steps, list) or not steps:
        raise Lfm2npError(f"{where}: steps must be a non-empty list")
    for n, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if op == "feed":
            feed(step, n)
        elif op == "batch" and isinstance(step.get("feeds"), list) and step["feeds"]:
            if len({e.get("seq") for e in step["feeds"] if isinstance(e, dict)}) != len(step["feeds"]):
                raise Lfm2npError(f"{where}: step {n} feeds one sequence twice in a batch")
            for entry in step["feeds"]:
                feed(entry, n)
        elif op == "rollback":
            held = seqs.get(step.get("seq"))
            if held is None or type(step.get("n")) is not int or not 0 < step["n"] <= len(held):
                raise Lfm2npError(f"{where}: step {n} rolls back {step.get('n')!r:.20} positions of a sequence "
                                  f"that holds {0 if held is None else len(held)}")
            del held[len(held) - step["n"]:]
        else:
            raise Lfm2npError(f"{where}: step {n} is not a feed, a batch or a rollback")
    return out


# ------------------------------------------------------------------------------------- the scenarios
def greedy(model: Any, ids: list[int], n: int = CONTINUATION) -> list[int]:
    """The reference's greedy continuation of ``ids``: ``n`` tokens (decoded with the model's state)."""
    logits, state = model.step(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits, state = model.step(out[-1:], state)
    return out


def scenario_steps(name: str, main: list[int], short: list[int], others: list[list[int]],
                   follow: list[int], cont: list[int]) -> list[dict[str, Any]]:
    """The steps of scenario ``name`` on the prompts' ids: ``main`` (a conversation), ``short`` (a text),
    ``others`` (for the batch), ``follow`` (a second turn's ids) and ``cont`` (main's greedy continuation)."""
    def feed(ids: list[int], seq: int = 0) -> dict[str, Any]:
        return {"op": "feed", "seq": seq, "ids": [int(i) for i in ids]}

    if name == "decode-tokenwise":
        return [feed([i]) for i in short[:TOKENWISE]]
    if name == "decode-chunked":
        a, b = max(1, len(main) // 3), max(2, 2 * len(main) // 3)
        return [feed(main[:a]), feed(main[a:b]), feed(main[b:])] if len(main) > 2 else [feed(main)]
    if name == "decode-second-prefill":
        return [feed(main), *(feed([t]) for t in cont[:2]), feed(follow)]
    if name == "decode-rollback":  # a draft of four: two right, two rejected; then decoding resumes
        draft = cont[:2] + [main[-1], main[0]]
        return [feed(main), feed(draft), {"op": "rollback", "seq": 0, "n": 2}, *(feed([t]) for t in cont[2:])]
    if name == "decode-batch":
        rows = [main, *others][:3]
        lengths = sorted({len(r) for r in rows})
        rows = [r[: max(1, len(r) - n)] for n, r in enumerate(rows)] if len(lengths) < len(rows) else rows
        first = [{"seq": s, "ids": [int(i) for i in r]} for s, r in enumerate(rows)]
        second = [{"seq": 0, "ids": [int(cont[0])]}] + [{"seq": s, "ids": [int(r[0])]} for s, r in
                                                        enumerate(rows) if s]
        return [{"op": "batch", "feeds": first}, {"op": "batch", "feeds": second}]
    raise Lfm2npError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")


# ------------------------------------------------------------------------------------- references
def routing_margins(model: Any, tensors: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per position: the smallest relative top-k margin over the MoE layers (see the module docstring), or None for
    a model without MoE layers (or one that chooses every expert)."""
    c = model.config
    k = c.num_experts_per_tok if c.is_moe else 0
    rows = None
    for i in c.moe_layers if c.is_moe and k < c.num_experts else ():
        p = f"model.layers.{i}.feed_forward."
        s = np.asarray(tensors.get(p + "biased_scores", tensors.get(p + "router_scores")), np.float64)
        top = -np.sort(-s, axis=-1)
        scale = float(np.max(np.abs(s))) or 1.0
        gap = (top[:, k - 1] - top[:, k]) / scale
        rows = gap if rows is None else np.minimum(rows, gap)
    return rows


def _scores_patterns(model: Any) -> list[str]:
    return ["model.layers.*.feed_forward.biased_scores", "model.layers.*.feed_forward.router_scores", "lm_head"]


def feed_references(model: Any, feeds: list[Feed]) -> dict[str, np.ndarray]:
    """``logits.<k>`` (and, for MoE models, ``margin.<k>``) of each feed, from one forward pass per branch: each
    feed's rows are those of the longest later sequence that extends its own."""
    out: dict[str, np.ndarray] = {}
    done: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray | None]] = {}
    for f in feeds:
        branch = max((g.sequence for g in feeds if g.seq == f.seq and g.sequence[:len(f.sequence)] == f.sequence),
                     key=len)
        if branch not in done:
            logits, trace = record(model, list(branch), _scores_patterns(model))
            margins = routing_margins(model, trace.tensors)
            done[branch] = (logits, None if margins is None else np.minimum.accumulate(margins))
        logits, margins = done[branch]
        end = f.start + len(f.ids)
        out[f"logits.{f.index}"] = np.ascontiguousarray(logits[f.start:end])
        if margins is not None:
            out[f"margin.{f.index}"] = np.ascontiguousarray(margins[f.start:end])
    return out


def usual_patterns(model: Any) -> list[str]:
    """The trace names of :data:`USUAL_STEPS` for this model, and the embeddings and final norm."""
    c = model.config
    names = ["model.embed_tokens", "model.embedding_norm"]
    for i in range(c.num_hidden_layers):
        names += [f"model.layers.{i}" + (f".{s}" if s else "") for s, _ in layer_steps(c, i) if s in USUAL_STEPS]
    return names


def oneshot_task(model: Any, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """The reference of a oneshot case: ``ids``, ``logits.0`` (and ``margin.0``) and the usual intermediates."""
    ids = [int(i) for i in payload["ids"]]
    logits, trace = record(model, ids, usual_patterns(model) + _scores_patterns(model))
    margins = routing_margins(model, trace.tensors)
    out = {"ids": np.asarray(ids, np.int64), "logits.0": logits}
    if margins is not None:
        out["margin.0"] = np.minimum.accumulate(margins)
    keep = set(usual_patterns(model))
    out.update({k: v for k, v in trace.tensors.items() if k in keep})
    return out


def scenario_task(model: Any, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The steps and the reference of a decoding scenario (``payload``: name and the prompts' ids)."""
    cont = greedy(model, payload["main"])
    steps = scenario_steps(payload["name"], payload["main"], payload["short"], payload["others"],
                           payload["follow"], cont)
    return steps, feed_references(model, play(steps, payload["name"]))


def operators_task(model: Any, payload: dict[str, Any]):
    """The per-operator cases: :func:`lfm2np.oracle.golden.golden_vectors` on the payload's ids and layers."""
    return golden_vectors(model, payload["ids"], payload["layers"])


def one_layer_of_each_kind(config: Any) -> list[int]:
    """The first layer of each kind (mixer, and dense or MoE FFN): the operator cases' layers by default."""
    kinds: dict[tuple[str, bool], int] = {}
    for i, kind in enumerate(config.layer_types):
        kinds.setdefault((kind, config.is_moe_layer(i)), i)
    return sorted(kinds.values())
