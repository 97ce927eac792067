"""The MLflow pyfunc face of a model artifact: `mlflow.pyfunc.load_model("models:/…@champion")`.

The registry entry holds the artifact (tuneloop.models): a LoRA adapter and its base
reference, never the base weights, so MLflow cannot corrupt the base on the way back; or,
after full fine-tuning, all the weights. Logged as a model from code (this file is the
model's definition), not pickled.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Answer prompts with a LoRA adapter on its verified base model, or a fully fine-tuned model."""

    def load_context(self, context: Any) -> None:
        from tuneloop.models import load_adapter_model

        # The artifact is logged as "adapter" or, with all weights, as "model" (tasks/registry.py).
        artifact = context.artifacts.get("adapter") or context.artifacts["model"]
        self.model, self.tokenizer = load_adapter_model(artifact)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would enforce them
        """Return one answer per prompt (a list of prompts, or a frame with a `prompt` column)."""
        from tuneloop.generation import generate_batch

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        chats = [[{"role": "user", "content": str(p)}] for p in prompts]
        return [g.text for g in generate_batch(self.model, self.tokenizer, chats, max_new_tokens)]


mlflow.models.set_model(AdapterModel())
