"""Shared fixtures: one real SmolLM2 (fp32, CPU) per session for the integration tier."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smollm():
    """(adapter) of the real smollm2-135m in fp32 on the CPU."""
    import torch

    from krul import models
    from krul.adapter import ModelAdapter

    torch.manual_seed(0)
    model, tokenizer = models.load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    return ModelAdapter(model, tokenizer, "smollm2-135m")


@pytest.fixture(scope="session")
def short_test_conversations():
    """The first 3 ShareGPT `test` conversations (hash order) with >= 3 user turns, <= 1500 tokens."""
    from krul import data

    out = []
    for conv in data.load_conversations("sharegpt", split="test"):
        users = conv.user_turn_indices()
        if len(users) < 3:
            continue
        size = sum(len(m["content"]) for m in conv.messages[: users[2] + 2])
        if size > 4000:  # characters; ~1000 tokens
            continue
        out.append(conv)
        if len(out) == 3:
            break
    return out
