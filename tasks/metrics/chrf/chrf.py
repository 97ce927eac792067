"""Corpus chrF (character n-gram F-score) via sacrebleu, scaled to [0, 1]."""

import datasets
import evaluate
import sacrebleu


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Popović, 2015. chrF.",
            inputs_description="predictions, references: str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100}
