"""`GET /v1/models` in OpenAI's list shape: every served model, under each name it answers to."""

from fastapi import APIRouter

from service.api.deps import EnginesDep
from service.api.schemas import ERROR_RESPONSES, ModelCard, ModelList
from service.engine.engine import Engine

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


def _card(engine: Engine, name: str) -> ModelCard:
    info = engine.info
    created = int(engine.adapter.model_dir.stat().st_mtime)
    return ModelCard(
        id=name,
        created=created,
        architecture=info.architecture,
        sampling_rate=info.sampling_rate,
        can_translate=info.can_translate,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(engines: EnginesDep) -> ModelList:
    """The default model first (its served name, then its aliases), then the others."""
    return ModelList(data=[_card(engines.get(name), name) for name in engines.names()])


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, engines: EnginesDep) -> ModelCard:
    return _card(engines.get(model_id), model_id)
