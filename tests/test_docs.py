"""/docs works offline: every script, style and icon it loads is served by the service itself."""

from __future__ import annotations

import re

from tests.test_api import Api, api

__all__ = ["api"]  # the fixture, shared with test_api


async def test_docs_page_loads_nothing_from_outside(api: Api) -> None:
    page = await api.anon.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
    assert urls, page.text
    assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "validatorUrl" in page.text  # the badge that would ask validator.swagger.io is off
    for url in urls:
        asset = await api.anon.get(url)
        assert asset.status_code == 200, url
    script = await api.anon.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert "javascript" in script.headers["content-type"]
    assert len(script.content) > 100_000
    assert (await api.anon.get("/openapi.json")).json()["info"]["title"] == "broker-bridge"
    assert (await api.anon.get("/redoc")).status_code == 404  # FastAPI's ReDoc page is CDN-only
