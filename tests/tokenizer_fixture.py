"""Shared by the GGUF and tokenizer tests: a byte-level BPE tokenizer of realistic size (32768 + 3 tokens)
trained in LFM2's tokenizer.json layout, and tiny checkpoints that carry it.

Training takes ~2 s; the result is cached in the process (``functools.lru_cache``) and on disk in the
system's temporary directory, keyed by a hash of this file and the tokenizers version (so a change to the
corpus or the layout retrains it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import lfm2np
from lfm2np.io.gguf_tokenizer import LFM2_SPLIT_REGEX
from lfm2np.io.safetensors import save_checkpoint
from lfm2np.synthetic import random_params

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "tests" / "data" / "lfm2_chat_template.jinja"

SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
] + [f"<|reserved_{i}|>" for i in range(10)]
PAD_ID, BOS_ID, IM_END_ID = 0, 1, 7
VOCAB_SIZE = 32768

# ------------------------------------------------------------------------------------------- corpus
STDLIB_FILES = [
    "argparse.py", "typing.py", "inspect.py", "pydoc.py", "doctest.py", "difflib.py", "dataclasses.py",
    "enum.py", "pathlib.py", "subprocess.py", "tarfile.py", "zipfile.py", "_pydecimal.py", "statistics.py",
    "textwrap.py", "functools.py", "shutil.py", "configparser.py", "calendar.py", "fractions.py",
    "ipaddress.py", "threading.py", "tokenize.py", "traceback.py", "logging/__init__.py", "unittest/mock.py",
    "http/client.py", "urllib/request.py", "collections/__init__.py", "email/_header_value_parser.py",
    "asyncio/base_events.py", "ast.py",
]
SCRIPTS = [
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИКЛМНОПРСТУФХЦЧШЭЮЯ",
    "αβγδεζηθικλμνξοπρσςτυφχψωάέήίόύώΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوية",
    "אבגדהוזחטיכלמנסעפצקרשת",
    "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसहािीुूेैोौंः्",
    "".join(chr(c) for c in range(0xAC00, 0xAC00 + 400, 3)),  # Hangul syllables
    "".join(chr(c) for c in range(0x4E00, 0x4E00 + 1200, 2)) + "的一是不了人我在有他这中大来上国个到说们为子和你",
    "".join(chr(c) for c in range(0x3041, 0x3097)) + "".join(chr(c) for c in range(0x30A1, 0x30FB)),  # kana
    "กขคงจฉชซญดตถทนบปผพฟภมยรลวสหอฮะาิีึืุูเแโใไ่้๊๋",
    "abcdefghijklmnopqrstuvwxyzàáâäãåæçèéêëìíîïñòóôöõøœßùúûüýÿąćęłńśźżčďěňřšťůž",
]
EMOJI = ["😀", "🚀", "✅", "🦙", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "😶‍🌫️", "🤖", "✨", "🔥", "🎉"]
PUNCT = [".", ",", "!", "?", ";", ":", "…", "—", "«", "»", "「", "」", "。", "、", "(", ")", "\"", "'"]
SPACES = [" ", " ", " ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "    ", " \n", "\t\t"]
CONTRACTIONS = ["don't", "I'LL", "we've", "she's", "they'RE", "I'm", "you'd", "It'S"]


def synthetic_docs(rng: random.Random, n_docs: int = 1200) -> list[str]:
    """Pseudo-text in many scripts: words from a per-document lexicon, digits, emoji, punctuation,
    contractions and whitespace runs."""
    docs = []
    for _ in range(n_docs):
        alphabet = rng.choice(SCRIPTS)
        lexicon = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(60)]
        parts = []
        for _ in range(rng.randint(40, 160)):
            r = rng.random()
            if r < 0.70:
                parts.append(rng.choice(lexicon))
            elif r < 0.78:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            elif r < 0.83:
                parts.append(rng.choice(EMOJI))
            elif r < 0.90:
                parts.append(rng.choice(PUNCT))
            else:
                parts.append(rng.choice(CONTRACTIONS))
            parts.append(rng.choice(SPACES))
        docs.append("".join(parts))
    return docs


def corpus() -> list[str]:
    """Offline text: CPython's pydoc topics, some stdlib sources (code), synthetic multilingual text."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        if (stdlib / name).is_file():
            texts.append((stdlib / name).read_text(encoding="utf-8", errors="replace"))
    return texts + synthetic_docs(random.Random(20250611))


def train_lfm2_layout_tokenizer() -> Tokenizer:
    """A byte-level BPE laid out like LFM2's tokenizer.json (special tokens first, regex split + ByteLevel,
    ByteLevel decoder, BOS template post-processor), plus added tokens after training: non-special ones
    (one already in the vocabulary, so not at the end) and a special one at the end."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A <|startoftext|> $B",
                                      special_tokens=[("<|startoftext|>", BOS_ID)]),
    ])
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert "python" in tok.get_vocab()  # so the added "python" keeps its mid-vocabulary id (as in LFM2)
    tok.add_tokens(["python", "<think>", "</think>"])  # HF defaults: special=False, normalized=True
    tok.add_special_tokens([AddedToken("<|cot_start|>", special=True, normalized=False)])
    return tok



#: Texts the rebuilt tokenizers must encode exactly as the original: code, whitespace runs, digits, contractions
#: (one with a long s, where llama.cpp's ASCII rewrite of the regex differs), scripts, emoji, special strings.
TEXTS = [
    "", " ", "  ", "\t", "\n", "\r\n", "a", "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n",
    "    \t  \n\n\n   \r\n\r\n \t\t\t x   y\u00a0z\u3000w", " \n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "1234567890123456789 3.14159 1e-9 0x1F 3 33 333 3333 33333 3..3 3...3",
    "don't I'LL we've She'S they'Re it'ſt WE'D you'll",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Καλημέρα κόσμε, ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我想在apple工作1314151天～ 你好，世界。日本語のテキストも、カタカナも。",
    "مرحبا بالعالم، هذا نص عربي.", "שלום עולם", "नमस्ते दुनिया, यह हिन्दी है।", "안녕하세요 세계", "สวัสดีชาวโลก",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇩🇪 👍🏽",
    "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319 क्षि",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|startoftext|><|im_start|>system\nList of tools: <|tool_list_start|>[{\"name\": \"f\"}]<|tool_list_end|>"
    "<|im_end|>\n<|tool_call_start|>[f()]<|tool_call_end|><|tool_response_start|>ok<|tool_response_end|>",
    "<|pad|><|endoftext|><|fim_pre|>a<|fim_suf|>b<|fim_mid|><|reserved_3|><|cot_start|>",
    "<think>reasoning</think> I love python and pythonic code; python3 <thinking>",
    "<|im_start <|im_end| <|unknown|> <|im_start|<|im_end|>> |> <| |>",
    "'''''''```````\"\"\"\"......!!!!!!?????? ------======= нещо на Български",
    "\x00\x01\x7f\ufeff\ufffd \U0010ffff \u200b\u200c\u200d",
    "x" * 300, " " * 100 + "end", "\n" * 50,
]


def _cache_file() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes() + tokenizers.__version__.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "lfm2np-tests" / f"lfm2-layout-bpe-{key}.json"


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The trained tokenizer as tokenizer.json text (trained once, then cached in memory and on disk)."""
    path = _cache_file()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = train_lfm2_layout_tokenizer().to_str()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def trained_tokenizer() -> Tokenizer:
    """A fresh ``tokenizers.Tokenizer`` of the trained vocabulary (cheap: parsed from the cached JSON)."""
    return Tokenizer.from_str(tokenizer_json())


#: tokenizer_config.json of LFM2 checkpoints (the fields that matter), with the committed LFM2 chat template.
TOKENIZER_CONFIG = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                    "add_bos_token": True, "add_eos_token": False}

#: The model vocabulary of the tiny checkpoints: the tokenizer's 32771 tokens and 5 ids no token has (the
#: converter writes them as [PAD{i}], type unused), as real checkpoints round their vocabulary up.
MODEL_VOCAB = VOCAB_SIZE + 3 + 5


def write_tokenizer_files(directory: Path, template: bool = True) -> Path:
    """tokenizer.json, tokenizer_config.json (and chat_template.jinja) of the trained tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1), encoding="utf-8")
    if template:
        (directory / "chat_template.jinja").write_text(TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    return directory


def tiny_config(kind: str = "dense") -> lfm2np.Config:
    """tiny-dense (D 48) or tiny-moe with the trained tokenizer's vocabulary (ids 1 BOS, 7 EOS, 0 pad)."""
    c = lfm2np.load_config("tiny-dense" if kind == "dense" else "tiny-moe")
    return c.replace(vocab_size=MODEL_VOCAB, bos_token_id=BOS_ID, eos_token_id=(IM_END_ID,), pad_token_id=PAD_ID)


@functools.lru_cache(maxsize=None)
def tiny_params(kind: str = "dense", seed: int = 7) -> dict[str, np.ndarray]:
    params = random_params(tiny_config(kind), seed=seed)
    for name in params:  # spread router logits: no near-ties
        if name.endswith("feed_forward.gate.weight"):
            params[name] = params[name] * 8
    return params


def tiny_checkpoint(directory: Path, kind: str = "dense", template: bool = True) -> Path:
    """A checkpoint directory (config.json, model.safetensors, the tokenizer files) of a tiny random model."""
    save_checkpoint(directory, tiny_config(kind), tiny_params(kind))
    return write_tokenizer_files(directory, template)
