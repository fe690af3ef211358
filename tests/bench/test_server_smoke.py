"""``python -m sglang_tq.bench smoke`` sends prompts inside each model config's vocabulary.

Its two prompts are Llama-3 token ids; a dummy DeepSeek-V2-Lite (vocabulary 102400)
refused id 128000 with a 400 under the plugin and crashed stock SGLang in cuBLAS
(H100, 2026-12-07), so the smoke never reached decode.
"""

from __future__ import annotations

import json
import os

import pytest

import sglang_tq.bench.smoke as server_smoke
from tests.conftest import MODEL_CONFIGS

CONFIGS = str(MODEL_CONFIGS)


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_prompts_fit_every_model_configs_vocabulary(name):
    vocab = server_smoke.vocab_size(os.path.join(CONFIGS, name))
    assert vocab, f"{name}: no vocab_size in its config.json"
    prompts = server_smoke.prompts_for(os.path.join(CONFIGS, name))
    assert [len(p) for p in prompts] == [len(p) for p in server_smoke.PROMPTS]
    assert all(0 <= i < vocab for p in prompts for i in p)


def test_llama_prompts_are_unchanged_and_text_config_is_read(tmp_path):
    assert server_smoke.prompts_for(os.path.join(CONFIGS, "llama-3.1-8b")) == server_smoke.PROMPTS
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 1000}}))
    assert server_smoke.prompts_for(str(tmp_path))[0][0] == 128000 % 1000
    assert server_smoke.vocab_size(str(tmp_path / "missing")) is None
