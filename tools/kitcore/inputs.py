"""Token inputs of the Llama and Qwen3-MoE checks: the checkpoint's tokenizer, text, random and edge
inputs, and padded batches.

Every input is a list of rows of token ids; `pad()` turns rows into a padded batch (`Inputs`) and
`Inputs.row(i)` gives one row back without its padding. A checkpoint without tokenizer files works
from token ids (`--input_ids`, `--inputs random`, the edge cases that need no text); where text is
needed it gets one line saying so.
"""

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .tiny import DEFAULT_PROMPT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# real text for batches of ragged prompts: the module docstrings of a few standard-library modules
# (present wherever Python is, read with `ast`, nothing imported)
TEXT_MODULES = ("textwrap.py", "functools.py", "argparse.py", "json/__init__.py", "collections/__init__.py",
                "pathlib/__init__.py", "pathlib.py", "inspect.py", "typing.py")
RANDOM_PROMPT_TOKENS = 32

# --edge cases: name -> what it feeds the engine
EDGE_CASES = {
    "one_token": "a one-token prompt (the default prompt's first token)",
    "bos_only": "the document-start token alone (bos_token_id, else eos_token_id: GPT-style checkpoints start "
                "a document after end-of-text)",
    "repeated_512": "the same token 512 times (the default prompt's first token)",
    "extreme_ids": "the lowest and highest token ids (0 and vocab_size - 1) around the default prompt",
    "at_max_positions": "a prompt that, with the decode steps, fills max_position_embeddings exactly",
    "long_4096": "a 4,096-token prompt (real text, repeated as needed)",
}


def has_tokenizer(path):
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer(path, alternative="pass token ids with --input_ids or use --inputs random"):
    """encode(text) -> ids with the checkpoint's tokenizer: tokenizer.json through the `tokenizers` library
    (fast to load; its post-processor adds BOS where the model wants it), else transformers' AutoTokenizer.
    A checkpoint without tokenizer files is a usage error that names the alternatives."""
    path = Path(path)
    if not has_tokenizer(path):
        raise UsageError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); text inputs need "
                         f"one: {alternative}")
    try:
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            return lambda text: tok.encode(text, add_special_tokens=True).ids
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return lambda text: tok(text, add_special_tokens=True)["input_ids"]
    except Exception as exc:  # tokenizers raises a bare Exception on a corrupt file
        raise UsageError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]}); "
                         f"{alternative}") from None


def text_stream(encode, tokens):
    """`tokens` ids of real text: the docstrings of TEXT_MODULES, repeated when they are too short."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids = []
    for name in TEXT_MODULES:
        try:
            tree = ast.parse((root / name).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        ids += encode("\n\n".join(d for d in docs if d))
    if not ids:
        ids = encode(DEFAULT_PROMPT)
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def random_rows(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def text_rows(encode, lengths):
    """Rows of the given lengths from disjoint windows of real text (so that no two rows share a prefix)."""
    stream = text_stream(encode, sum(lengths))
    rows, at = [], 0
    for n in lengths:
        rows.append(stream[at:at + n])
        at += n
    return rows


def edge_row(name, config, path, extra_positions=0):
    """The token ids of one --edge case, checked against the checkpoint's limits (UsageError otherwise)."""
    vocab, max_pos = config["vocab_size"], config.get("max_position_embeddings")

    def first_token():
        return tokenizer(path)(DEFAULT_PROMPT)[0] if has_tokenizer(path) else 1

    def fill(tokens):
        if max_pos and tokens + extra_positions > max_pos:
            raise UsageError(f"--edge {name}: {tokens} tokens" + (f" + {extra_positions} decode steps" if extra_positions
                             else "") + f" exceed max_position_embeddings={max_pos} of this checkpoint; choose "
                             "a checkpoint with a longer context or another --edge case")
        if has_tokenizer(path):
            return text_stream(tokenizer(path), tokens)
        return random_rows([tokens], vocab, 0)[0]

    if name == "one_token":
        return [first_token()]
    if name == "bos_only":
        bos = config.get("bos_token_id")
        bos = config.get("eos_token_id") if bos is None else bos
        bos = bos[0] if isinstance(bos, list) else bos
        if bos is None:
            raise UsageError("--edge bos_only: the checkpoint's config has neither bos_token_id nor eos_token_id")
        return [bos]
    if name == "repeated_512":
        fill(512)  # the length check
        return [first_token()] * 512
    if name == "extreme_ids":
        middle = tokenizer(path)(DEFAULT_PROMPT) if has_tokenizer(path) else random_rows([16], vocab, 0)[0]
        return [0, vocab - 1] + middle + [vocab - 1, 0]
    if name == "at_max_positions":
        if not max_pos:
            raise UsageError("--edge at_max_positions: the checkpoint's config has no max_position_embeddings")
        if max_pos - extra_positions < 1:
            raise UsageError(f"--edge at_max_positions: {extra_positions} decode steps leave no room for a prompt "
                             f"in max_position_embeddings={max_pos}; use fewer --decode_steps")
        return fill(max_pos - extra_positions)
    if name == "long_4096":
        return fill(4096)
    raise UsageError(f"--edge {name!r}: unknown case; cases are {', '.join(EDGE_CASES)}")


def check_rows(rows, config, extra_positions=0):
    vocab, max_pos = config["vocab_size"], config.get("max_position_embeddings")
    for r in rows:
        if not r:
            raise UsageError("empty input: no tokens; give a prompt or --input_ids")
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}); fix --input_ids")
        if max_pos and len(r) + extra_positions > max_pos:
            raise UsageError(f"input of {len(r)} tokens" + (f" + {extra_positions} decode steps" if extra_positions
                             else "") + f" exceeds max_position_embeddings={max_pos}; shorten the prompt")


@dataclass
class Inputs:
    input_ids: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], 1 = real token
    padded: bool
    side: str = "left"

    @property
    def mask_or_none(self):
        return self.attention_mask if self.padded else None

    @property
    def lengths(self):
        return self.attention_mask.sum(-1).tolist()

    def row(self, i):
        """Row i alone, without its padding."""
        real = self.attention_mask[i].bool()
        return pad([self.input_ids[i][real].tolist()])

    def real(self, i, tensor):
        """The entries of row i of `tensor` [B, S, ...] at its real tokens (drops the padding)."""
        return tensor[i][self.attention_mask[i].bool().to(tensor.device)]


def pad(rows, side="left", pad_id=0):
    """Rows of ids -> a padded batch. Left padding (the default) keeps every row's last token in the last
    column, as decoding needs; position ids count real tokens only."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Inputs(ids, positions, mask, padded=bool((mask == 0).any()), side=side)
