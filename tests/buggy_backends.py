"""Buggy backends for the diagnosis tests: an LFM2 / LFM2-MoE / LFM3 forward pass of their own, with the
porting mistakes as switches, independent of lfm2np's operators and of its mutation code.

:class:`Backend` is written from the formulas of LFM2-FACTS.md in plain NumPy, one token position and one
head at a time where that is clearer, with its own RMSNorm, conv window, RoPE, attention, router and
experts; for LFM3 its own sandwich norms, per-head output gate, sliding-window mask and RoPE per layer type
(proportional partial rotation on the full layers: the first ``int(factor * hd // 2)`` frequencies turn, the
rest are 0, cos/sin in float32), with LFM3's Qwen3-style names (o_proj, q_norm, k_norm, gate_proj) and
optional attention biases. It keeps a cache like a real backend (a conv window of L-1 rows per conv layer, K and V per
attention layer) and processes a sequence in calls: a prefill, then one token per call. Its ``bugs`` are the
catalogue's ids, each implemented here the way a backend author would get it wrong. It records a trace under
lfm2np's names, each name meaning what this backend computes under it (with qk-norm-after-rope its
``q_rope`` is the rotated, not yet normed query).

:func:`transformed_params` makes three of the mistakes the other way they happen in practice: by a weight
conversion (taps flipped, in_proj blocks exchanged, w1 and w3 exchanged), for lfm2np's correct forward.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

#: The LFM2 / LFM2-MoE mistakes (all but the router ones apply to LFM3 too) and LFM3's own.
BUGS = ("router-softmax", "router-bias-in-weights", "router-no-scaling", "router-no-renorm", "conv-taps-reversed",
        "conv-gates-swapped", "conv-state-dropped", "rope-interleaved", "rope-theta", "no-qk-norm",
        "qk-norm-after-rope", "embedding-norm-at-start", "swiglu-gate-up-swapped", "attention-scale")
LFM3_BUGS = ("lfm3-gate-missing", "lfm3-sandwich-norms-missing", "lfm3-rope-full", "lfm3-window-ignored")


def _rms(x, w, eps):
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))) * w


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class Backend:
    """A small independent LFM2 / LFM3 forward with porting mistakes. ``params``: Hugging Face names -> float32
    arrays. ``theta``: the base used by the rope-theta bug (for every attention layer type); ``scale``: the
    attention scale of the attention-scale bug; ``drop_on``: when conv-state-dropped loses the conv window:
    ``"second-call"`` (the first call after the first: decode after a prefill) or ``"multi-token"`` (every
    call of several tokens that continues a sequence: a second prefill, transformers#42017); ``router_eps``:
    what the top-k weights' sum gets before dividing (transformers: 1e-6). An LFM3 config is read as
    trained: a partial_rotary_factor < 1 is honoured whatever the RoPE label (lfm3-rope-full: never)."""

    def __init__(self, config, params, bugs=(), theta=1e4, scale=None, drop_on="second-call", router_eps=1e-6):
        unknown = set(bugs) - set(BUGS) - set(LFM3_BUGS)
        assert not unknown, unknown
        self.c, self.W, self.bugs = config, {k: np.asarray(v, np.float32) for k, v in params.items()}, set(bugs)
        self.lfm3 = config.model_type == "lfm3"
        # RoPE per attention layer type: (base, partial factor); LFM2 has one, rope_theta, on every layer
        self.ropes = {r.kind: (r.theta, r.partial_rotary_factor) for r in config.rope_parameters} if self.lfm3 \
            else {"full_attention": (config.rope_theta, None)}
        if "rope-theta" in self.bugs:
            self.ropes = {kind: (theta, factor) for kind, (_, factor) in self.ropes.items()}
        self.scale = (scale if scale is not None else 1.0 / config.head_dim) if "attention-scale" in self.bugs \
            else config.head_dim ** -0.5
        self.drop_on, self.router_eps = drop_on, router_eps
        self.reset()

    def reset(self):
        c = self.c
        self.pos, self.calls = 0, 0
        self.window = {i: np.zeros((c.conv_L_cache - 1, c.hidden_size), np.float32) for i in c.conv_layers}
        self.K = {i: np.zeros((0, c.num_key_value_heads, c.head_dim), np.float32) for i in c.attention_layers}
        self.V = {i: self.K[i].copy() for i in c.attention_layers}
        self.trace = defaultdict(list)

    # ------------------------------------------------------------------ driving it
    def feed(self, ids):
        """One call: process ``ids`` after what the cache holds; returns their logits (T, V)."""
        ids = np.asarray(ids, np.int64)
        if "conv-state-dropped" in self.bugs and self.calls > 0 and (
                (self.drop_on == "second-call" and self.calls == 1) or (self.drop_on == "multi-token" and len(ids) > 1)):
            for w in self.window.values():
                w[:] = 0.0  # the bug: the previous call's conv inputs are lost
        logits = self._forward(ids)
        self.pos += len(ids)
        self.calls += 1
        return logits

    def run(self, ids, prefill=None):
        """Logits of ``ids`` from a fresh sequence: ``ids[:prefill]`` in one call, then one id per call (all
        in one call when ``prefill`` is None). Returns the logits (T, V) and the trace {name: (T, ...)}."""
        self.reset()
        ids = np.asarray(ids, np.int64)
        cut = len(ids) if prefill is None else prefill
        rows = [self.feed(ids[:cut])] + [self.feed(ids[t:t + 1]) for t in range(cut, len(ids))]
        return np.concatenate(rows), {k: np.concatenate(v) if not k.endswith("inv_freq") else v[0][0]
                                      for k, v in self.trace.items()}

    def generate(self, prompt, n, fresh=True):
        """``n`` greedy tokens after ``prompt`` (one prefill call, then one call per token)."""
        if fresh:
            self.reset()
        logits = self.feed(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits[-1])))
            if len(out) < n:
                logits = self.feed([out[-1]])
        return out

    # ------------------------------------------------------------------ the model
    def _keep(self, name, value):
        self.trace[name].append(np.array(value, np.float32 if value.dtype.kind == "f" else value.dtype))

    def _forward(self, ids):
        c, W = self.c, self.W
        positions = np.arange(self.pos, self.pos + len(ids))
        for kind in dict.fromkeys(k for k in c.layer_types if k != "conv"):  # the RoPE tables of each type
            inv = self._frequencies(kind)
            if self.calls == 0:  # one per sequence: the frequencies do not depend on the position
                self._keep(f"model.rotary_emb.{kind}.inv_freq", inv[None])
            ang = positions.astype(np.float32)[:, None] * inv[None, :]
            self._keep(f"model.rotary_emb.{kind}.cos", np.cos(np.concatenate([ang, ang], axis=-1)))
            self._keep(f"model.rotary_emb.{kind}.sin", np.sin(np.concatenate([ang, ang], axis=-1)))
        h = W["model.embed_tokens.weight"][ids]
        self._keep("model.embed_tokens", h)
        if "embedding-norm-at-start" in self.bugs:
            h = _rms(h, W["model.embedding_norm.weight"], c.norm_eps)
            self._keep("model.embedding_norm", h)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = _rms(h, W[p + "operator_norm.weight"], c.norm_eps)
            self._keep(p + "operator_norm", x)
            y = self._attention(i, p, x) if c.is_attention(i) else self._conv(i, p, x)
            y = self._post_norm(p + "post_operator_norm", y)
            h = h + y
            self._keep(p + "mixer_residual", h)
            x = _rms(h, W[p + "ffn_norm.weight"], c.norm_eps)
            self._keep(p + "ffn_norm", x)
            y = self._moe(i, p, x) if c.is_moe_layer(i) else self._mlp(p + "feed_forward.", x, record=True)
            self._keep(p + "feed_forward.output", y)
            y = self._post_norm(p + "post_ffn_norm", y)
            h = h + y
            self._keep(f"model.layers.{i}", h)
        if "embedding-norm-at-start" not in self.bugs:
            h = _rms(h, W["model.embedding_norm.weight"], c.norm_eps)
            self._keep("model.embedding_norm", h)
        head = W["model.embed_tokens.weight"] if c.tie_word_embeddings else W["lm_head.weight"]
        logits = h @ head.T
        self._keep("lm_head", logits)
        return logits

    def _post_norm(self, name, y):
        """LFM3's sandwich norm of a block's output (none in LFM2, none with lfm3-sandwich-norms-missing)."""
        if not (self.lfm3 and self.c.use_sandwich_norm) or "lfm3-sandwich-norms-missing" in self.bugs:
            return y
        y = _rms(y, self.W[name + ".weight"], self.c.norm_eps)
        self._keep(name, y)
        return y

    def _conv(self, i, p, x):
        c, W, D = self.c, self.W, self.c.hidden_size
        bias = (lambda n: W[p + n]) if c.conv_bias else (lambda n: 0.0)
        bcx = x @ W[p + "conv.in_proj.weight"].T + bias("conv.in_proj.bias")
        self._keep(p + "conv.in_proj", bcx)
        first, second, xx = bcx[:, :D], bcx[:, D:2 * D], bcx[:, 2 * D:]
        b, cg = (second, first) if "conv-gates-swapped" in self.bugs else (first, second)
        for n, v in (("b_gate", b), ("c_gate", cg), ("x", xx)):
            self._keep(p + "conv." + n, v)
        u = b * xx
        self._keep(p + "conv.bx", u)
        kernel = W[p + "conv.conv.weight"][:, 0, :]  # (D, L): the last tap on the current token
        if "conv-taps-reversed" in self.bugs:
            kernel = kernel[:, ::-1]
        L = kernel.shape[1]
        padded = np.concatenate([self.window[i], u])  # (L-1+T, D)
        z = np.stack([np.sum(kernel.T * padded[t:t + L], axis=0) for t in range(len(u))]) + bias("conv.conv.bias")
        self.window[i] = padded[-(L - 1):].copy()
        self._keep(p + "conv.conv_out", z)
        y = cg * z
        self._keep(p + "conv.y", y)
        out = y @ W[p + "conv.out_proj.weight"].T + bias("conv.out_proj.bias")
        self._keep(p + "conv.out_proj", out)
        return out

    def _frequencies(self, kind):
        hd = self.c.head_dim
        theta, factor = self.ropes[kind]
        inv = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
        if factor is not None and factor < 1 and "lfm3-rope-full" not in self.bugs:
            inv[int(factor * hd // 2):] = 0.0  # proportional: only the first pairs turn (hd still the denominator)
        return inv

    def _rope(self, x, positions, kind):
        hd = x.shape[-1]
        ang = positions.astype(np.float32)[:, None] * self._frequencies(kind)[None, :]  # (T, hd/2), float32
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = np.empty_like(x)
        if "rope-interleaved" in self.bugs:
            a, b = x[..., 0::2], x[..., 1::2]
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        else:
            a, b = x[..., :hd // 2], x[..., hd // 2:]
            out[..., :hd // 2], out[..., hd // 2:] = a * cos - b * sin, b * cos + a * sin
        return out

    def _attention(self, i, p, x):
        c, W, a = self.c, self.W, p + "self_attn."
        T, H, G, hd = len(x), c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kind = c.layer_types[i]
        biased = self.lfm3 and c.attention_bias

        def proj(name, n):
            return (x @ W[a + name + ".weight"].T + (W[a + name + ".bias"] if biased else 0.0)).reshape(T, n, hd)

        q, k, v = proj("q_proj", H), proj("k_proj", G), proj("v_proj", G)
        for n, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            self._keep(a + n, t)
        positions = np.arange(self.pos, self.pos + T)
        qn, kn = (W[a + "q_norm.weight"], W[a + "k_norm.weight"]) if self.lfm3 else \
            (W[a + "q_layernorm.weight"], W[a + "k_layernorm.weight"])
        if "qk-norm-after-rope" in self.bugs:
            q, k = self._rope(q, positions, kind), self._rope(k, positions, kind)
            self._keep(a + "q_rope", q)
            self._keep(a + "k_rope", k)
            q, k = _rms(q, qn, c.norm_eps), _rms(k, kn, c.norm_eps)
            self._keep(a + "q_normed", q)
            self._keep(a + "k_normed", k)
        else:
            if "no-qk-norm" not in self.bugs:
                q, k = _rms(q, qn, c.norm_eps), _rms(k, kn, c.norm_eps)
                self._keep(a + "q_normed", q)
                self._keep(a + "k_normed", k)
            q, k = self._rope(q, positions, kind), self._rope(k, positions, kind)
            self._keep(a + "q_rope", q)
            self._keep(a + "k_rope", k)
        self.K[i], self.V[i] = np.concatenate([self.K[i], k]), np.concatenate([self.V[i], v])
        K, V = self.K[i], self.V[i]
        W_ = c.sliding_window if kind == "sliding_attention" and "lfm3-window-ignored" not in self.bugs else None
        out = np.zeros((T, H, hd), np.float32)
        for t in range(T):
            end = self.pos + t + 1  # keys 0 .. position t
            first = 0 if W_ is None else max(0, end - W_)  # a sliding layer: the last W of them
            for j in range(H):
                g = j // (H // G)
                s = (K[first:end, g] @ q[t, j]) * np.float32(self.scale)
                e = np.exp(s - s.max())
                out[t, j] = (e / e.sum()) @ V[first:end, g]
        if self.lfm3 and c.use_attention_gate:
            self._keep(a + "attention", out.reshape(T, H * hd))  # before the gate
        if self.lfm3 and c.use_attention_gate and "lfm3-gate-missing" not in self.bugs:
            gate = _sigmoid(x @ W[a + "gate_proj.weight"].T)  # (T, H): one scalar per token and head
            self._keep(a + "gate", gate)
            out = out * gate[:, :, None]
        out = out.reshape(T, H * hd)
        self._keep(a + "attn_out", out)
        y = out @ W[a + ("o_proj" if self.lfm3 else "out_proj") + ".weight"].T
        if biased:
            y = y + W[a + "o_proj.bias"]
        self._keep(a + "out_proj", y)
        return y

    def _mlp(self, p, x, record=False):
        gate, up = x @ self.W[p + "w1.weight"].T, x @ self.W[p + "w3.weight"].T
        act = (up * _sigmoid(up)) * gate if "swiglu-gate-up-swapped" in self.bugs else (gate * _sigmoid(gate)) * up
        y = act @ self.W[p + "w2.weight"].T
        if record:
            for n, a in (("w1", gate), ("w3", up), ("act", act), ("w2", y)):
                self._keep(p + n, a)
        return y

    def _moe(self, i, p, x):
        c, W, bugs = self.c, self.W, self.bugs
        logits = x @ W[p + "feed_forward.gate.weight"].T
        self._keep(p + "feed_forward.router_logits", logits)
        if "router-softmax" in bugs:
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            scores = e / e.sum(axis=-1, keepdims=True)
        else:
            scores = _sigmoid(logits)
        self._keep(p + "feed_forward.router_scores", scores)
        bias = W.get(p + "feed_forward.expert_bias")
        choose = scores + bias if bias is not None else scores
        if bias is not None:
            self._keep(p + "feed_forward.biased_scores", choose)
        chosen = np.argsort(-choose, axis=-1, kind="stable")[:, :c.num_experts_per_tok]
        self._keep(p + "feed_forward.selected_experts", chosen)
        weights = np.take_along_axis(choose if "router-bias-in-weights" in bugs else scores, chosen, axis=-1)
        self._keep(p + "feed_forward.topk_scores", weights)
        if c.norm_topk_prob:
            if "router-no-renorm" not in bugs:
                weights = weights / (weights.sum(axis=-1, keepdims=True) + self.router_eps)
            self._keep(p + "feed_forward.topk_normed", weights)
        if "router-no-scaling" not in bugs:
            weights = weights * c.routed_scaling_factor
        self._keep(p + "feed_forward.routing_weights", weights.astype(np.float32))
        out = np.zeros_like(x)
        for t in range(len(x)):
            for e, w in zip(chosen[t], weights[t]):
                out[t] += np.float32(w) * self._mlp(f"{p}feed_forward.experts.{e}.", x[t:t + 1])[0]
        return out


def transformed_params(config, params, bug):
    """``params`` as a faulty weight conversion leaves them, for lfm2np's correct forward: conv taps flipped
    (conv-taps-reversed), the B and C blocks of in_proj exchanged (conv-gates-swapped), or w1 and w3
    exchanged in every FFN and expert (swiglu-gate-up-swapped)."""
    out = dict(params)
    D = config.hidden_size
    for name, w in params.items():
        if bug == "conv-taps-reversed" and name.endswith("conv.conv.weight"):
            out[name] = w[..., ::-1].copy()
        elif bug == "conv-gates-swapped" and name.endswith(("conv.in_proj.weight", "conv.in_proj.bias")):
            out[name] = np.concatenate([w[D:2 * D], w[:D], w[2 * D:]])
        elif bug == "swiglu-gate-up-swapped" and name.endswith("w1.weight"):
            out[name], out[name[:-len("w1.weight")] + "w3.weight"] = params[name[:-len("w1.weight")] + "w3.weight"], w
    assert any(out[n] is not params[n] for n in params), f"{bug}: nothing to transform"
    return out
