"""Swagger UI at /docs from files shipped in the package (``broker_bridge/static/swagger-ui``):
FastAPI's default page loads its script and styles from a CDN, so it rendered blank on a machine
without internet. ReDoc (also CDN-only in FastAPI) is not offered."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
SWAGGER = "/static/swagger-ui"


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=str(app.openapi_url),
            title=f"{app.title} - API docs",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
            # The validator badge would ask validator.swagger.io about our document.
            swagger_ui_parameters={"validatorUrl": None},
        )
