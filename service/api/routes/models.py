"""`GET /v1/models` in OpenAI's list shape."""

from fastapi import APIRouter

from service.api.deps import EngineDep, SettingsDep
from service.api.schemas import ERROR_RESPONSES, ModelCard, ModelList
from service.errors import ModelNotFound

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


def _card(engine: EngineDep, name: str) -> ModelCard:
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
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    names = [settings.served_name, *settings.model_aliases]
    return ModelList(data=[_card(engine, name) for name in names])


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, engine: EngineDep, settings: SettingsDep) -> ModelCard:
    if model_id not in (settings.served_name, *settings.model_aliases):
        raise ModelNotFound(f"model {model_id!r} is not loaded", param="model")
    return _card(engine, model_id)
