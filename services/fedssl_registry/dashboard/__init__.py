"""Web dashboard (issue 5): placeholder router until the dashboard lands."""

from fastapi import APIRouter

router = APIRouter()
