"""Text datasets for masked discrete diffusion.

* ``markov-text``: sequences from a random sparse Markov chain over a small alphabet, fixed by a
  seed. Its likelihood is exact, so generated text can be scored under the true source.
* ``char-text``: character-level text from files on disk; by default a corpus built from what
  ships with Python (the stdlib's docstrings, its LICENSE and the Zen of Python).

Both return token ids in ``[0, vocab_size)``; ``info`` carries ``vocab`` (one string per id),
``vocab_size``, ``encode(str) -> ids`` / ``decode(ids) -> str`` and a ``signature`` that
checkpoints use to tell whether they were trained on this very source.
"""
from __future__ import annotations

import ast
import codecs
import functools
import re
import sysconfig
from pathlib import Path

import torch

import diffbench
from diffbench.data import DataSource
from diffbench.registry import Dataset, Option

MARKOV_DEFAULTS = {"vocab": 16, "seq_len": 32, "branching": 3, "smoothing": 0.01, "seed": 0}
CHAR_DEFAULTS = {"seq_len": 64, "paths": ""}
MARKOV_OPTIONS = {"vocab": Option(16, min=2), "seq_len": Option(32, min=1), "branching": Option(3, min=1),
                  "smoothing": Option(0.01, min=0.0, max=1.0), "seed": Option(0, min=0)}
# A fixed alphabet, so a checkpoint fits any corpus: lower-case text, whitespace collapsed to
# one space, every other character dropped.
CHAR_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,;:'\"()[]-_=+*/<>!?#%&"
# Stdlib modules whose docstrings make the default char-text corpus (missing ones are skipped).
STDLIB_MODULES = (
    "textwrap", "argparse", "collections/__init__", "functools", "json/__init__", "pathlib", "subprocess",
    "threading", "typing", "dataclasses", "inspect", "logging/__init__", "unittest/case", "email/message",
    "http/client", "random", "statistics", "fractions", "decimal", "calendar", "datetime", "shutil",
    "tempfile", "zipfile", "tarfile", "csv", "configparser", "difflib", "pprint", "string", "re/__init__",
    "enum", "abc", "contextlib", "heapq", "bisect", "os", "io", "socket", "asyncio/tasks", "asyncio/events",
    "sqlite3/__init__", "urllib/parse", "xml/dom/minidom", "pydoc", "doctest", "pdb", "cmd", "optparse",
    "getopt", "locale", "gettext", "codecs", "base64", "hashlib", "hmac", "secrets", "uuid", "pickle",
    "copy", "shelve", "weakref", "types", "operator", "numbers",
)


def _signature(name: str, options: dict) -> str:
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def _codec(alphabet):
    """encode / decode between strings and token ids over ``alphabet`` (unknown characters dropped)."""
    index = {ch: i for i, ch in enumerate(alphabet)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index[ch] for ch in text if ch in index], dtype=torch.long)

    def decode(ids) -> str:
        return "".join(alphabet[i] if 0 <= i < len(alphabet) else "_" for i in torch.as_tensor(ids).tolist())

    return encode, decode


# ----------------------------------------------------------------------------------------------
# markov-text


class MarkovChain:
    """A stationary Markov chain: x_1 ~ π, x_{i+1} ~ P[x_i]; π is the stationary distribution.

    P is sparse plus a little uniform smoothing: every state moves to ``branching`` successors
    (one of them on a random cycle through all states, so the chain is irreducible) with
    Dirichlet(1) weights, mixed with ``smoothing`` × uniform so every sequence has finite NLL
    (an off-support transition costs about −log(smoothing / V) nats).
    """

    def __init__(self, vocab: int, branching: int, smoothing: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        cycle = torch.randperm(vocab, generator=g)
        successor = torch.empty(vocab, dtype=torch.long)
        successor[cycle] = cycle.roll(-1)
        sparse = torch.zeros(vocab, vocab, dtype=torch.float64)
        for i in range(vocab):
            others = torch.randperm(vocab, generator=g)
            targets = torch.cat([successor[i : i + 1], others[others != successor[i]][: branching - 1]])
            weights = -torch.rand(branching, generator=g, dtype=torch.float64).log()  # Dirichlet(1) via Exp(1)
            sparse[i, targets] = weights / weights.sum()
        self.support = sparse > 0  # [V, V]
        self.transition = (1 - smoothing) * sparse + smoothing / vocab  # [V, V], rows sum to 1
        evals, evecs = torch.linalg.eig(self.transition.T)
        pi = evecs[:, evals.real.argmax()].real
        self.initial = pi / pi.sum()  # [V]

    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator)[:, 0]
        for i in range(1, length):
            x[:, i] = torch.multinomial(self.transition[x[:, i - 1]], 1, generator=generator)[:, 0]
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) [N] of sequences x [N, L]: log π(x_1) + Σ_i log P(x_i, x_{i+1})."""
        x = x.long().cpu()
        return self.initial.log()[x[:, 0]] + self.transition.log()[x[:, :-1], x[:, 1:]].sum(1)

    def entropy_rate(self) -> float:
        """H = −Σ_i π_i Σ_j P_ij log P_ij (nats per transition)."""
        return float(-(self.initial[:, None] * self.transition * self.transition.log()).sum())

    def entropy_per_token(self, length: int) -> float:
        """E[−log p(x)] / L for sequences of ``length``: (H(π) + (L − 1) H) / L."""
        h_initial = float(-(self.initial * self.initial.log()).sum())
        return (h_initial + (length - 1) * self.entropy_rate()) / length

    def off_support(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of each sequence's transitions [N] outside the sparse support."""
        x = x.long().cpu()
        return (~self.support[x[:, :-1], x[:, 1:]]).double().mean(1)


def load_markov_text(vocab: int, seq_len: int, branching: int, smoothing: float, seed: int) -> DataSource:
    chain = MarkovChain(vocab, branching, smoothing, seed)
    alphabet = [chr(ord("a") + i) if i < 26 else f"<{i}>" for i in range(vocab)]
    encode, decode = _codec(alphabet)
    options = {"vocab": vocab, "seq_len": seq_len, "branching": branching, "smoothing": smoothing, "seed": seed}
    return DataSource(
        name="markov-text", modality="text", shape=(seq_len,),
        draw=lambda n, g: (chain.sample(n, seq_len, g), None),
        log_prob=chain.log_prob,
        info={"vocab": alphabet, "vocab_size": vocab, "encode": encode, "decode": decode, "chain": chain,
              "transition": chain.transition, "initial": chain.initial,
              "nll": lambda x: -chain.log_prob(x) / x.shape[1],  # exact NLL per token [N]
              "entropy_per_token": chain.entropy_per_token(seq_len), "entropy_rate": chain.entropy_rate(),
              "signature": _signature("markov-text", options)},
    )


# ----------------------------------------------------------------------------------------------
# char-text


@functools.lru_cache(maxsize=4)
def default_corpus() -> str:
    """Text that ships with Python: the Zen of Python, the LICENSE and stdlib docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    zen = ast.literal_eval(next(  # this.py stores the Zen rot13-encoded in the string `s`
        node.value for node in ast.parse((root / "this.py").read_text()).body
        if isinstance(node, ast.Assign) and node.targets[0].id == "s"))
    parts = [codecs.decode(zen, "rot13")]
    if (root / "LICENSE.txt").is_file():
        parts.append((root / "LICENSE.txt").read_text(errors="ignore"))
    for module in STDLIB_MODULES:
        path = root / f"{module}.py"
        if path.is_file():
            tree = ast.parse(path.read_text(errors="ignore"))
            parts += [doc for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and (doc := ast.get_docstring(node))]
    return "\n".join(parts)


def read_corpus(paths: str) -> str:
    """The text of ``paths`` (files or folders of *.txt / *.md / *.py, separated by ','), in order."""
    files = []
    for item in filter(None, (p.strip() for p in paths.split(","))):
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".md", ".py", ".rst"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"char-text: no such file or folder {item!r}")
    return "\n".join(f.read_text(errors="ignore") for f in files)


def load_char_text(seq_len: int, paths: str) -> DataSource:
    encode, decode = _codec(CHAR_ALPHABET)
    text = re.sub(r"\s+", " ", (read_corpus(paths) if paths else default_corpus()).lower())
    ids = encode(text)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"char-text: corpus has {len(ids)} characters, fewer than seq_len={seq_len}")
    return DataSource(
        name="char-text", modality="text", shape=(seq_len,), examples=ids[: n * seq_len].view(n, seq_len),
        info={"vocab": list(CHAR_ALPHABET), "vocab_size": len(CHAR_ALPHABET), "encode": encode, "decode": decode,
              "unigram_entropy": _unigram_entropy(ids, len(CHAR_ALPHABET)),
              "signature": _signature("char-text", {"seq_len": seq_len})},
    )


def _unigram_entropy(ids: torch.Tensor, vocab: int) -> float:
    p = torch.bincount(ids, minlength=vocab).double() / len(ids)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


@diffbench.hookimpl
def register_datasets(register):
    register(Dataset(name="markov-text", family="text", options=MARKOV_OPTIONS, load=load_markov_text,
                     description="sequences of a seeded random sparse Markov chain; exact likelihood and entropy rate"))
    register(Dataset(name="char-text", family="text", load=load_char_text,
                     options={**CHAR_DEFAULTS, "seq_len": Option(64, min=1)},
                     description="character-level text chunks: stdlib docstrings/LICENSE/Zen by default, or your files (paths)"))
