# %% [markdown]
# # 05 · The full forward pass and generation, walking a trace
#
# The embedded tiny LFM2-MoE model was trained for a few minutes on the Python documentation's help
# topics (`tools/train_tiny.py`). It is small and has largely memorised that text: ask it about a
# statement the docs describe and it answers with their first sentence. Here it runs end to end: a chat prompt, the walk through the layers,
# greedy and sampled generation, and the decoding state.

# %%
import numpy as np

import lfm2np
from lfm2np.embedded import embedded_model_path, layer_walk
from lfm2np.generate import Generation, Sampling
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.trace import record

path = embedded_model_path()
model = lfm2np.load(path)
tok = Tokenizer.from_dir(path)
c = model.config
print(model)
print("layer pattern:", c.layer_pattern())

# %% [markdown]
# ## A prompt in the LFM2 chat format

# %%
messages = [{"role": "user", "content": 'What is the "while" statement?'}]
text = tok.apply_chat_template(messages)
print(repr(text))
ids = tok.encode_chat(messages)
print(len(ids), "tokens:", ids)

# %% [markdown]
# ## Walking the trace: the residual stream through the layers
# Each layer adds its mixer's and its feed-forward's output to the residual stream.

# %%
logits, trace = record(model, ids)
for i in range(c.num_hidden_layers):
    kind = "attention" if c.is_attention(i) else "conv     "
    ffn = "MoE  " if c.is_moe_layer(i) else "dense"
    mix = trace[f"model.layers.{i}.mixer_residual"] - (trace[f"model.layers.{i - 1}"] if i else trace["model.embed_tokens"])
    out = trace[f"model.layers.{i}"]
    print(f"layer {i}: {kind} + {ffn} | mixer adds rms {np.sqrt((mix ** 2).mean()):.3f} "
          f"| stream rms {np.sqrt((out ** 2).mean()):.3f}")
top = np.argsort(-logits[-1])[:5]
print("next-token candidates:", [(tok.decode([i]), round(float(logits[-1, i]), 2)) for i in top])
print(layer_walk(model, tok, ids, last=8))          # experts of the last 8 tokens, in context

# %% [markdown]
# ## Generation
# Each new token is one `model.step` with the decoding state; the prompt is one prefill. On the question
# above the model is sure of every token (it memorised that answer), so greedy decoding and sampling agree.
# On a vaguer question its first token is open: greedy takes the most likely one ("Unlike", about one
# chance in five) and recites the wrong help topic, while sampling from the model's own distribution
# (temperature 1, seeded: reproducible) draws another opening and answers differently.

# %%
from lfm2np.generate import probabilities

stop = tok.stop_ids(c.eos_token_id)
sure = [tok.decode(list(Generation(model, ids, 40, s, stop))) for s in (Sampling(), Sampling(temperature=1.0, seed=1))]
print("the while question, greedy and sampled:", sure[0], "| the same:", sure[0] == sure[1])
question = tok.encode_chat([{"role": "user", "content": "Explain exceptions."}])
p = probabilities(model.forward(question)[-1], Sampling(temperature=1.0))
print("first token of the reply:", [(tok.decode([int(i)]), round(float(p[i]), 3)) for i in np.argsort(-p)[:4]])
greedy = Generation(model, question, 40, Sampling(), stop)
greedy_text = tok.decode(list(greedy))
print("greedy :", greedy_text, f"[{greedy.finish_reason}]")
sampled = Generation(model, question, 40, Sampling(temperature=1.0, seed=1), stop)
sampled_text = tok.decode(list(sampled))
print("sampled:", sampled_text, f"[{sampled.finish_reason}]")
assert greedy.tokens[0] != sampled.tokens[0] and greedy_text.split()[0] != sampled_text.split()[0]

# %% [markdown]
# ## The state is a value
# Continuing from the state after the prompt equals recomputing everything from scratch.

# %%
prompt_logits, state = model.step(ids)
first = int(np.argmax(prompt_logits[-1]))
step_logits, _ = model.step([first], state)
scratch = model.forward(ids + [first])[-1]
print("step vs scratch: equal to float32 rounding:", np.allclose(step_logits[-1], scratch, atol=1e-4))
assert np.allclose(step_logits[-1], scratch, atol=1e-4)
print("state:", state.position, "positions,", state.nbytes, "bytes")
