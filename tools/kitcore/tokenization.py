"""The engine's own input path (`--tokenization` of end-to-end validation): the ids it computes from text.

Teacher forcing hands engines token ids, so an engine's own tokenisation is invisible to the logits
checks; users hand it text and chat messages. This check gives the engine the prompt as text and as one
user message, takes the ids it actually used (its `tokenize()`: hf's tokenizer, llama.cpp's, vLLM's
`prompt_token_ids`, a server's /tokenize) and compares them with the checkpoint's tokenizer
(`AutoTokenizer(text)`, `apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`):
the first differing position, BOS/EOS counts (a second BOS where a rendered template already carries
one: vLLM #16853, InfiniLM e0110e1d), and, where the engine tells them, its stop tokens against
generation_config.json's eos_token_id.
"""

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class IdsCheck:
    kind: str  # "text" | "chat" | "stop tokens"
    passed: bool
    expected: list
    got: list
    message: str


def _reference_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _ids(encoded):
    """apply_chat_template's answer as a list of ids (transformers 5 may hand back a BatchEncoding)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def compare_ids(kind, expected, got, bos=None, eos=None):
    """The engine's ids `got` against the checkpoint tokenizer's `expected`: one IdsCheck with the first
    difference and the BOS/EOS counts named."""
    if got == expected:
        return IdsCheck(kind, True, expected, got, f"{kind}: the engine's {len(got)} ids are the checkpoint's")
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    notes = []
    for name, token in (("BOS", bos), ("EOS", eos)):
        if token is not None and got.count(token) != expected.count(token):
            notes.append(f"{got.count(token)} {name} (id {token}) where the checkpoint's tokenizer has "
                         f"{expected.count(token)}" + (": a duplicate BOS" if name == "BOS" and
                                                      got.count(token) > expected.count(token) else ""))
    if len(got) > len(expected) and got[len(got) - len(expected):] == expected:
        notes.append(f"{len(got) - len(expected)} extra token(s) in front: {got[:len(got) - len(expected)]}")
    message = (f"{kind}: the engine's ids differ from the checkpoint's at position {first} (engine "
               f"{got[first:first + 4]}, checkpoint {expected[first:first + 4]}; {len(got)} vs {len(expected)} ids)"
               + (f"; {'; '.join(notes)}" if notes else ""))
    return IdsCheck(kind, False, expected, got, message)


def check_engine(engine, checkpoint_path, prompt):
    """The engine's ids for `prompt` as text and as a chat message, and its stop tokens, against the
    checkpoint's: ([IdsCheck], [what was skipped, and why]). A chat check needs the checkpoint's chat
    template; the engine answers None for an input kind it cannot tokenise itself."""
    tok = _reference_tokenizer(checkpoint_path)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    checks, skipped = [], []
    got = engine.tokenize(text=prompt)
    if got is not None:
        checks.append(compare_ids("text", list(tok(prompt).input_ids), list(got), bos, eos))
    else:
        skipped.append("text: the engine does not tokenise plain text itself")
    if not tok.chat_template:
        skipped.append("chat: the checkpoint has no chat template")
    else:
        messages = [{"role": "user", "content": prompt}]
        got = engine.tokenize(messages=messages)
        if got is not None:
            expected = _ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
            checks.append(compare_ids("chat", expected, list(got), bos, eos))
        else:
            skipped.append("chat: the engine does not apply a chat template the kit can read back")
    from .protocol import capabilities

    stops = engine.stop_tokens() if "stop_tokens" in capabilities(engine) else None
    config = Path(checkpoint_path) / "generation_config.json"
    if stops is not None and config.is_file():
        wanted = json.loads(config.read_text()).get("eos_token_id")
        wanted = sorted(set(wanted if isinstance(wanted, list) else [wanted])) if wanted is not None else []
        missing = [t for t in wanted if t not in stops]
        checks.append(IdsCheck("stop tokens", not missing, wanted, sorted(stops),
                               f"stop tokens: the engine stops at {sorted(stops)}"
                               + (f"; it does not stop at {missing} of generation_config.json" if missing
                                  else ", generation_config.json's included")))
    return checks, skipped
