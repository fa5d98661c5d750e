"""Plan validation on the real SmolLM2: the stored state is the candidate of lower divergence."""
import pytest

from krul import validation
from krul.calibrate import grid_policy
from krul.engine import Engine
from krul.restore import restore
from krul.store import MemoryStore

pytestmark = pytest.mark.integration


class _Recording(MemoryStore):
    """A store that keeps every state put into it."""

    def __init__(self):
        super().__init__()
        self.puts = []

    def put(self, key, state):
        self.puts.append(state)
        return super().put(key, state)


def test_validated_offload_stores_the_candidate_of_lower_divergence(smollm, short_test_conversations):
    conv = short_test_conversations[0]
    n = smollm.n_layers
    policy = grid_policy("krul-svd-loss", 0.0, 4, n).with_params(
        needs_estimator=False, validate_tokens=16, dev_pairs=((0, 1), (2, 3), (4, 5), (6, 7)))
    exact_store, store = _Recording(), _Recording()
    list(Engine(smollm, "full-load", exact_store, max_new_tokens=1).replay(conv, max_turns=2))
    list(Engine(smollm, policy, store, max_new_tokens=1).replay(conv, max_turns=2))
    assert len(store.puts) == len(exact_store.puts) == 2
    for turn, (exact, state) in enumerate(zip(exact_store.puts, store.puts)):
        v = state.meta["validation"]
        assert v["candidates"] == 2 and v["tokens"] == 16
        assert v["chosen"] == min(("own", "dev"), key=lambda c: v[f"kl_{c}"])
        assert 0 < v[f"kl_{v['chosen']}"] <= max(v["kl_own"], v["kl_dev"])
        chosen_pairs = {tuple(p) for p in state.meta["plan"]["pairs"]}
        assert len(chosen_pairs) == 4
        if v["chosen"] == "dev":
            assert chosen_pairs == {(0, 1), (2, 3), (4, 5), (6, 7)}
        if turn > 0:  # later turns' reference runs over the restored (compressed) older segments
            continue
        # the recorded divergence is that of the stored state against the exact history's predictions
        ids = exact.token_ids.tolist()
        exact_layers, _ = restore(smollm, exact, overlap=False)
        reference = validation.next_token_logprobs(smollm, ids, exact_layers, 16)
        assert validation.state_divergence(smollm, exact, reference) == pytest.approx(0.0, abs=1e-6)
        assert validation.state_divergence(smollm, state, reference) == pytest.approx(
            v[f"kl_{v['chosen']}"], rel=1e-4, abs=1e-7)
