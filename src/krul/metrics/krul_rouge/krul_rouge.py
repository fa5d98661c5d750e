"""ROUGE-L as a local `evaluate` metric module (the hub's `rouge` script cannot load offline).

Loaded by path: `evaluate.load(str(Path(krul.metrics.__file__).parent / "krul_rouge"))`.
Computed by the `rouge-score` package (Lin, 2004), F-measure, with stemming.
"""
import datasets
import evaluate
from rouge_score import rouge_scorer


class KrulRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure (rouge-score, stemmed)",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description="predictions: list[str], references: list[str]",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores) if scores else float("nan"), "per_item": scores}
