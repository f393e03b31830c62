"""Making a conformance pack (:mod:`lfm2np.oracle.conformance` describes its files).

:func:`make_pack` computes every case as an independent task through a ``runner``: ``runner(fn, tasks,
on_result)`` hands ``fn(model, t.payload)`` of each task to ``on_result(index, result)``, serially or on a Dask
cluster (:mod:`lfm2np.cluster`; this module knows neither). Each case's files are written as its result arrives,
then the manifest, with the hash of every file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..io.prompts import Prompt, prompts_json
from ..version import __version__
from . import conformance_cases as K
from .conformance import FORMAT, MANIFEST, PROMPTS, VERSION, config_hash, file_sha256, manifest_digest
from .conformance import tensor_inventory
from .conformance import tokenizer_hashes
from .golden import save_arrays, save_golden
from .tolerance import COMPARE_TIERS, operator_tier

#: a second turn, fed after decoding in the second-prefill scenario (ChatML markers: every LFM tokenizer has them)
FOLLOW_UP = '<|im_end|>\n<|im_start|>user\nAnd the "for" statement?<|im_end|>\n<|im_start|>assistant\n'


class TaskSpec:
    """What a runner is given per task: ``payload`` for the function, ``what`` for progress and errors (the
    shape of :class:`lfm2np.cluster.Task`)."""

    def __init__(self, payload: Any, what: str):
        self.payload, self.what = payload, what


def _clip(text: str | None, n: int = 40) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def make_pack(out: "str | os.PathLike[str]", *, name: str, source: "str | os.PathLike[str]", config: Config,
              tokenizer: Any, prompts: Sequence[Prompt], runner: Callable[..., list],
              dtype: str = "float32", op_layers: "list[int] | None" = None,
              task: Callable[[Any, str], Any] = TaskSpec) -> Path:
    """Make the pack of the model ``name`` (read from ``source``, a checkpoint directory or a .gguf; ``config`` its
    config) on ``prompts`` into directory ``out``: see :mod:`lfm2np.oracle.conformance`. ``op_layers``: the
    layers of the per-operator cases (None: one layer of each kind). ``runner(fn, tasks, on_result)`` runs the
    tasks, handing each result to ``on_result(index, result)`` as it arrives (:func:`lfm2np.cluster.run_tasks`);
    ``task(payload, what)`` makes its task objects. Returns ``out``."""
    out = Path(out)
    if not prompts:
        raise Lfm2npError("a pack needs at least one prompt")
    layers = K.one_layer_of_each_kind(config) if op_layers is None else sorted(set(op_layers))
    bad = [i for i in layers if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise Lfm2npError(f"--op-layers {bad[0]}: the model has {config.num_hidden_layers} layers")
    encoded = {p.id: p.encode(tokenizer) for p in prompts}
    for p in prompts:
        if len(encoded[p.id]) > config.max_position_embeddings:
            raise Lfm2npError(f"prompt {p.id!r}: {len(encoded[p.id])} tokens, beyond the model's context "
                              f"{config.max_position_embeddings}")
    bad_id = next(((p.id, i) for p in prompts for i in encoded[p.id] if not 0 <= i < config.vocab_size), None)
    if bad_id:
        raise Lfm2npError(f"prompt {bad_id[0]!r}: token id {bad_id[1]} is outside the vocabulary (0.."
                          f"{config.vocab_size - 1})")
    main = next((p for p in prompts if p.kind == "chat"), prompts[0])
    short = next((p for p in prompts if p.kind == "text"), prompts[0])
    others = [encoded[p.id] for p in prompts if p.id != main.id][:2]
    follow = tokenizer.encode(FOLLOW_UP) if tokenizer is not None else encoded[short.id][1:] or encoded[short.id]
    follow = [i for i in follow if 0 <= i < config.vocab_size] or encoded[short.id]

    tasks, kinds = [], []
    for p in prompts:
        shown = _clip(p.rendered(tokenizer) if tokenizer is not None else str(encoded[p.id]))
        tasks.append(task(("oneshot_task", {"ids": encoded[p.id]}), f"case oneshot-{p.id} (prompt {p.id!r}: "
                                                                    f"{shown!r})"))
        kinds.append(("oneshot", p))
    for scenario in K.SCENARIOS:
        tasks.append(task(("scenario_task", {"name": scenario, "main": encoded[main.id], "short": encoded[short.id],
                                             "others": others, "follow": follow}),
                          f"case {scenario} (prompt {main.id!r})"))
        kinds.append((scenario, main))
    tasks.append(task(("operators_task", {"ids": encoded[short.id], "layers": layers}),
                      f"the operator cases (prompt {short.id!r})"))
    kinds.append(("operators", short))
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lfm2npError(f"{out}: cannot create the pack's directories ({e.strerror or e})") from None
    tier, op_tier = COMPARE_TIERS["fp32"], operator_tier(COMPARE_TIERS["fp32"])
    written: dict[int, list[dict[str, Any]]] = {}
    last_row: dict[str, np.ndarray] = {}  # the llama.cpp prompt's last logits

    def write(n: int, result: Any) -> None:
        """One task's case (or operator cases) written as it arrives: a corpus's references never all in memory."""
        kind, prompt = kinds[n]
        if kind == "operators":
            written[n] = _operator_cases(out, result, op_tier.name)
            return
        if kind == "oneshot":
            steps, arrays = [{"op": "feed", "seq": 0, "ids": encoded[prompt.id]}], result
            case_id = f"oneshot-{prompt.id}"
            if prompt.id == short.id:
                last_row["logits"] = np.asarray(arrays["logits.0"][-1], np.float32)
        else:
            (steps, arrays), case_id = result, kind
        rel = f"cases/{case_id}.npz"
        save_arrays(arrays, out / rel)
        written[n] = [{"id": case_id, "kind": "oneshot" if kind == "oneshot" else "decode", "tier": tier.name,
                       "prompt": prompt.id, "file": rel, "proves": K.PROVES[kind], "steps": steps,
                       "feeds": [f.to_json() for f in K.play(steps, case_id)],
                       "intermediates": sorted(k for k in arrays if k.startswith(("model.", "lm_head")))}]

    runner(_dispatch, tasks, write)
    cases = [c for n in range(len(tasks)) for c in written[n]]
    cases += _llama_cpp_files(out, name, short, encoded[short.id], last_row["logits"], tier.name)
    (out / PROMPTS).write_text(json.dumps([{**p.to_json(), "rendered": p.rendered(tokenizer) if tokenizer else None,
                                            "token_ids": encoded[p.id]} for p in prompts], indent=1,
                                          ensure_ascii=False) + "\n", encoding="utf-8")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": FORMAT, "version": VERSION, "lfm2np": __version__, "made_by": "lfm2np conformance make",
        "model": {"name": name, "source": str(source), "format": None, "config": config.to_dict(),
                  "config_hash": config_hash(config), "tokenizer": tokenizer_hashes(source, tokenizer)
                  if tokenizer is not None else None, "tensors": []},
        "reference": {"computed_by": f"lfm2np {__version__}", "dtype": dtype, "decoding": "greedy, teacher-forced",
                      "prompts_file": PROMPTS},
        "tiers": {t.name: {"max_rel": t.max_rel, "nmse_db": t.nmse_db, "exact_routing": t.exact_routing,
                           "why": t.why} for t in (tier, op_tier)},
        "cases": cases, "files": {}}
    manifest["model"]["format"], manifest["model"]["tensors"] = tensor_inventory(source)
    manifest["files"] = {rel: file_sha256(out / rel) for rel in files if rel in _listed(cases, files)}
    manifest["digest"] = manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _listed(cases: list[dict[str, Any]], files: list[str]) -> set[str]:
    """The pack's files the manifest lists: every file written here (a file left from an earlier pack in a
    directory written with --force is not)."""
    mine = {c["file"] for c in cases} | {f for c in cases for f in c.get("files", ())}
    mine |= {PROMPTS, "ops/manifest.json", "ops/model.npz"}
    return {f for f in files if f in mine}


def _dispatch(model: Any, payload: tuple[str, Any]) -> Any:
    """One task: the case function named in ``payload`` (module-level, so that a worker can import it)."""
    fn, arg = payload
    return {"oneshot_task": K.oneshot_task, "scenario_task": K.scenario_task,
            "operators_task": K.operators_task}[fn](model, arg)


def _operator_cases(out: Path, vectors: Any, tier: str) -> list[dict[str, Any]]:
    """Write the golden vectors into ``out/ops`` as .npz files; one case per operator."""
    save_golden(vectors, out / "ops", "npz")
    golden = json.loads((out / "ops" / "manifest.json").read_text())
    cases = []
    for op in golden["operators"]:
        stem = op["file"].rsplit(".", 1)[0]
        names = {key: _output_name(op, key) for key in op["outputs"]}
        cases.append({"id": f"op-{stem.replace('_', '-', 1)}", "kind": "operator", "tier": tier,
                      "prompt": None, "file": f"ops/{op['file']}", "proves": K.PROVES["operator"],
                      "function": op["function"], "params": op["params"], "inputs": op["inputs"],
                      "weights": op["weights"], "outputs": names, "ids": golden["ids"]})
    return cases


#: an operator's output that is the operator's own value (its trace name is the operator's name), by function
OWN_OUTPUT = {"lfm2np.ops.rms_norm": "y", "lfm2np.ops.embed": "hidden", "lfm2np.layers.decoder_layer": "h",
              "lfm2np.ops.lm_head": "logits"}


def _output_name(op: dict[str, Any], key: str) -> str:
    """The trace name of an operator's output: ``output.q_rope`` of ``model.layers.2.self_attn`` is
    ``model.layers.2.self_attn.q_rope``; a norm's ``y``, an embedding's ``hidden``, a layer's ``h`` and the head's
    ``logits`` are the operator's own value."""
    return op["name"] if OWN_OUTPUT.get(op["function"]) == key else f"{op['name']}.{key}"


def _llama_cpp_files(out: Path, name: str, prompt: Prompt, ids: list[int], last: np.ndarray,
                     tier: str) -> list[dict[str, Any]]:
    """llama.cpp's model-conversion files for a text prompt (none for a conversation or ids: llama-logits reads
    plain text, adding BOS itself)."""
    if prompt.kind != "text":
        return []
    data = out / "llama.cpp" / "data"
    data.mkdir(parents=True, exist_ok=True)
    base = data / f"pytorch-{name}"
    last.tofile(f"{base}.bin")
    Path(f"{base}.txt").write_text("".join(f"{i}: {v:.6f}\n" for i, v in enumerate(last.tolist())))
    np.asarray(ids, np.int32).tofile(f"{base}-tokens.bin")
    Path(f"{base}-prompt.txt").write_text(f"prompt: {prompt.text}\nn_tokens: {len(ids)}\n"
                                          f"token ids: {', '.join(str(i) for i in ids)}\n", encoding="utf-8")
    rel = [str(Path(p).relative_to(out)) for p in (f"{base}.bin", f"{base}.txt", f"{base}-tokens.bin",
                                                    f"{base}-prompt.txt")]
    return [{"id": "llama.cpp", "kind": "llama.cpp", "tier": tier, "prompt": prompt.id, "file": rel[0],
             "files": rel, "model_name": name, "text": prompt.text, "ids": [int(i) for i in ids],
             "proves": K.PROVES["llama.cpp"]}]
