"""The one place a check's verdict is decided: judged outcomes in, one verdict out.

A check hands each thing it decided to `Verdict.add` as an `Outcome`: what it is about (a tensor, a step,
a row, the memory), whether it passed, and one message that says why not. Nothing rewrites an outcome
afterwards, and no script folds booleans: `Verdict.passed` is every outcome passing, `Verdict.line()` the
human verdict line (PASS with the check's note, or FAIL with the first failed outcome's message and how
many more failed), and `Results.finish` writes that line, the KIT verdict line and the outcomes into the
JSON, and returns the exit code.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Outcome:
    about: str  # what was judged: "logits", "step 3", "all steps: a_vs_ref", "memory" ...
    passed: bool
    message: str = ""  # one line: why it failed (or what it found)


class Verdict:
    """The outcomes of one check, in the order they were judged."""

    def __init__(self, pass_note=""):
        self.outcomes = []
        self.pass_note = pass_note  # what a PASS says, e.g. "every step CLOSE"

    def add(self, about, passed, message=""):
        """Record one judged outcome; returns whether it passed."""
        self.outcomes.append(Outcome(about, bool(passed), message))
        return bool(passed)

    @property
    def passed(self):
        return all(o.passed for o in self.outcomes)

    def failures(self):
        return [o for o in self.outcomes if not o.passed]

    def line(self):
        """`PASS[: note]` or `FAIL: <the first failure's message>[ (and N more failed: ...)]`."""
        failed = self.failures()
        if not failed:
            return "PASS" + (f": {self.pass_note}" if self.pass_note else "")
        first = failed[0].message or f"{failed[0].about} failed"
        more = failed[1:]
        named = ", ".join(o.about for o in more[:3]) + (", ..." if len(more) > 3 else "")
        return f"FAIL: {first}" + (f" (and {len(more)} more: {named})" if more else "")

    def as_list(self):
        return [asdict(o) for o in self.outcomes]
