"""Local metric modules for `evaluate` (loaded by path, never from the hub)."""
from pathlib import Path

ROUGE_PATH = str(Path(__file__).parent / "krul_rouge")


def rouge_l(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L F-measure through `evaluate` and the local module: {"rougeL", "per_item"}."""
    import evaluate

    metric = evaluate.load(ROUGE_PATH)
    return metric.compute(predictions=predictions, references=references)
