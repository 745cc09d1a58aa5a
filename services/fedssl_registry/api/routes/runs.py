"""/v1/runs: federated runs and their rounds, as the aggregator reports them."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ...core.errors import error_responses
from ...schemas import PostedRound, RoundCreate, RoundList, RunList, RunResponse, RunUpsert
from ..deps import ReadAuth, RegistryDep, WriteAuth

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get("", response_model=RunList, dependencies=[ReadAuth], responses=error_responses(401))
def list_runs(registry: RegistryDep) -> dict:
    return {"runs": registry.list_runs()}


@router.put("/{run_id}", response_model=RunResponse, dependencies=[WriteAuth], responses=error_responses(400, 401, 413, 422))
def upsert_run(run_id: str, body: RunUpsert, registry: RegistryDep) -> dict:
    return registry.upsert_run(run_id, body)


@router.get("/{run_id}", response_model=RunResponse, dependencies=[ReadAuth], responses=error_responses(400, 401, 404))
def get_run(run_id: str, registry: RegistryDep) -> dict:
    return registry.get_run(run_id)


@router.post("/{run_id}/rounds", status_code=201, response_model=PostedRound, dependencies=[WriteAuth],
             responses=error_responses(400, 401, 404, 413, 422))
def add_round(run_id: str, body: RoundCreate, registry: RegistryDep) -> dict:
    return registry.add_round(run_id, body)


@router.get("/{run_id}/rounds", response_model=RoundList, dependencies=[ReadAuth], responses=error_responses(400, 401, 404))
def list_rounds(run_id: str, registry: RegistryDep) -> dict:
    return {"run_id": run_id, "rounds": registry.rounds(run_id)}


@router.get("/{run_id}/rounds.csv", dependencies=[ReadAuth], response_class=PlainTextResponse,
            responses={200: {"description": "One row per round, phase and hospital", "content": {"text/csv": {"schema": {"type": "string"}}}},
                       **error_responses(400, 401, 404)})
def rounds_csv(run_id: str, registry: RegistryDep) -> PlainTextResponse:
    return PlainTextResponse(registry.rounds_csv(run_id), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{run_id}-rounds.csv"'})
