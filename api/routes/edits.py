"""/v1/edits: submit model edits (`supervised`, `reinforce`; `selfie_jobs.kinds.edits`). Each answers like POST
/v1/jobs (202 and the job); the job's status is at /v1/jobs/{id} (with its epochs done of the total) and its
epochs and, once it finished, its variant at /v1/jobs/{id}/results.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SenderDep, SessionDep, SettingsDep
from api.routes.jobs import SUBMIT_RESPONSES, submit
from api.schemas import JobAccepted
from selfie_jobs.kinds.edit_requests import ReinforceEditCreate, SupervisedEditCreate

router = APIRouter(prefix="/v1/edits", tags=["edits"], route_class=StrictJSONRoute)


@router.post("/supervised", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted,
             responses=SUBMIT_RESPONSES, summary="Submit a Supervised Control edit (a source state to a target)")
def create_supervised(body: SupervisedEditCreate, request: Request, response: Response, session: SessionDep,
                      settings: SettingsDep, who: PrincipalDep, sender: SenderDep) -> JobAccepted:
    return submit(body, request, response, session, settings, who, sender)


@router.post("/reinforce", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted,
             responses=SUBMIT_RESPONSES, summary="Submit a Reinforcement Control edit (away from what a judge rejects)")
def create_reinforce(body: ReinforceEditCreate, request: Request, response: Response, session: SessionDep,
                     settings: SettingsDep, who: PrincipalDep, sender: SenderDep) -> JobAccepted:
    return submit(body, request, response, session, settings, who, sender)
