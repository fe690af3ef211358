"""GSM8K with lm_eval's ``gsm8k_cot`` recipe (lm_eval 0.4.13, ``tasks/gsm8k/gsm8k-cot.yaml``).

Prompt: the yaml's 8 exemplars, each ``"Q: <question>\\nA: <target>\\n\\n"`` (doc_to_text
``"Q: {{question}}\\nA:"``, lm_eval's default target delimiter " " and few-shot delimiter
"\\n\\n"), then ``"Q: <question>\\nA:"``. No chat template: the same plain text goes to
every model, as lm_eval sends it without ``--apply_chat_template``.

Generation: greedy (temperature 0), stop at ``"Q:"``, ``"</s>"``, ``"<|im_end|>"`` (the
yaml's ``until``), at most 256 new tokens (the yaml sets no ``max_gen_toks``, so lm_eval
uses its models' default of 256).

Scoring, both of the yaml's filters on the completion, then exact match:

* ``strict-match`` (**the headline**): the first match of ``The answer is (\\-?[0-9\\.\\,]+).``
  -- the answer in exactly the format the exemplars teach. Like lm_eval, the final ``.``
  of the pattern is any character, so a completion that ends right after the number
  loses the number's last digit to it; completions normally end in ".\\n\\n" before the
  "Q:" stop.
* ``flexible-extract``: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` -- the last
  number-like token anywhere, which forgives a broken answer format.

No match gives ``[invalid]``. Exact match, as lm_eval's metric config: from both the
extracted answer and the gold answer (the text after ``####``) remove, in this order,
``,``  ``$``  ``(?s).*#### ``  and a trailing ``.``, lower-case both, compare. The strict
filter is the headline because a KV cache that damages the model shows up first as
answers that drift from the demonstrated format, which flexible extraction hides.

The prepared ``gsm8k_cot.json`` carries these settings as read from the yaml;
:func:`check_source` refuses data whose settings differ from the constants here.
"""

from __future__ import annotations

import re

from .data import DataError, load_gsm8k, prepare_command

NAME = "gsm8k"
HEADLINE = "strict-match"
METRICS = ("strict-match", "flexible-extract")
STOP = ("Q:", "</s>", "<|im_end|>")
MAX_NEW_TOKENS = 256
NUM_FEWSHOT = 8
DOC_TO_TEXT = "Q: {{question}}\nA:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
STRICT_PATTERN = r"The answer is (\-?[0-9\.\,]+)."
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FILTERS = ((HEADLINE, STRICT_PATTERN, 0), ("flexible-extract", FLEXIBLE_PATTERN, -1))
IGNORE_PATTERNS = (",", r"\$", "(?s).*#### ", r"\.$")
INVALID = "[invalid]"

_STRICT_RE = re.compile(STRICT_PATTERN)
_FLEXIBLE_RE = re.compile(FLEXIBLE_PATTERN)
_IGNORE_RES = tuple(re.compile(p) for p in IGNORE_PATTERNS)


def question_text(question: str) -> str:
    return DOC_TO_TEXT.replace("{{question}}", question)


def build_prompt(question: str, exemplars: list[dict]) -> str:
    shots = "".join(
        question_text(e["question"]) + TARGET_DELIMITER + e["target"] + FEWSHOT_DELIMITER
        for e in exemplars
    )
    return shots + question_text(question)


def _extract(rx: re.Pattern, text: str, group_select: int) -> str:
    """lm_eval's regex filter: the ``group_select``-th match (of a multi-group pattern,
    its first non-empty group), stripped; INVALID when nothing matches."""
    matches = rx.findall(text or "")
    if not matches:
        return INVALID
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def extract_strict(text: str) -> str:
    return _extract(_STRICT_RE, text, 0)


def extract_flexible(text: str) -> str:
    return _extract(_FLEXIBLE_RE, text, -1)


def normalize(answer: str) -> str:
    for rx in _IGNORE_RES:
        answer = rx.sub("", answer)
    return answer.lower()


def is_correct(extracted: str, gold: str) -> bool:
    return normalize(extracted) == normalize(gold)


def check_source(cot: dict, data_dir) -> None:
    """DataError unless the prepared yaml settings are the ones this module implements."""
    want = {
        "num_fewshot": NUM_FEWSHOT,
        "doc_to_text": DOC_TO_TEXT,
        "target_delimiter": TARGET_DELIMITER,
        "fewshot_delimiter": FEWSHOT_DELIMITER,
        "until": list(STOP),
        "max_gen_toks": None,
        "regexes_to_ignore": list(IGNORE_PATTERNS),
        "ignore_case": True,
        "ignore_punctuation": False,
        "filters": [[n, p, g] for n, p, g in FILTERS],
    }
    got = {k: cot.get(k) for k in want}
    got["filters"] = [
        [f.get("name"), f.get("regex_pattern"), f.get("group_select")]
        for f in cot.get("filters", [])
    ]
    bad = sorted(k for k in want if got[k] != want[k])
    if bad or len(cot.get("exemplars", [])) != NUM_FEWSHOT:
        raise DataError(
            f"{data_dir}/gsm8k_cot.json differs from this evaluator's gsm8k-cot settings "
            f"({', '.join(bad) or 'exemplar count'}); rerun `{prepare_command(data_dir)}`."
        )


class Task:
    """GSM8K-CoT items, generation settings and scoring for the runner."""

    name = NAME
    headline = HEADLINE
    metrics = METRICS

    def __init__(self, data_dir, limit: int | None = None):
        rows, cot = load_gsm8k(data_dir)
        check_source(cot, data_dir)
        self.exemplars = cot["exemplars"]
        rows = rows[:limit] if limit else rows
        self.items = [
            {
                "id": r["id"],
                "prompt": build_prompt(r["question"], self.exemplars),
                "gold": r["gold"],
            }
            for r in rows
        ]
        self.source = cot.get("source")

    def generation(self) -> dict:
        return {
            "temperature": 0.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop": list(STOP),
            "prompt_format": f"lm_eval gsm8k_cot: {NUM_FEWSHOT}-shot 'Q: ...\\nA: ...', no chat template",
            "source": self.source,
        }

    def score(self, item: dict, completion: str) -> dict:
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        return {
            "scores": {
                HEADLINE: int(is_correct(strict, item["gold"])),
                "flexible-extract": int(is_correct(flexible, item["gold"])),
            },
            "extracted": {HEADLINE: strict, "flexible-extract": flexible},
            "gold": item["gold"],
        }
