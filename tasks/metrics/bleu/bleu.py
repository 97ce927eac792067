"""Corpus BLEU via sacrebleu, scaled to [0, 1]."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Post, 2018. sacreBLEU.",
            inputs_description="predictions, references: str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100}
