"""GET /v1/models: the served model (its primary name; the model path is accepted as an alias)."""

from __future__ import annotations

from paphos.serve.openai.protocol import ModelCard, ModelList
from paphos.serve.openai.serving import ServingContext


def list_models(ctx: ServingContext) -> ModelList:
    root = str(ctx.engine.engine.model_config.model)
    card = ModelCard(id=ctx.model_name, root=root, max_model_len=ctx.max_model_len)
    return ModelList(data=[card])
