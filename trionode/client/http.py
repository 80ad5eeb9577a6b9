"""HTTP client over httpx: every call returns decoded JSON or raises ApiError."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from trionode.errors import TrionodeError


class ApiError(TrionodeError):
    """The node answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = await self._http.request(method, path, json=json)
        except httpx.TimeoutException:
            raise ApiError(f"{self._http.base_url}: timed out") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach node at {self._http.base_url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error:
            message = response.reason_phrase
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                message = str(body["error"].get("message", message))
            raise ApiError(f"{response.status_code}: {message}", response.status_code)
        return body

    async def health(self) -> Any:
        return await self.request("GET", "/admin-api/health")

    async def ready(self) -> Any:
        return await self.request("GET", "/admin-api/ready")

    async def node_info(self) -> Any:
        return await self.request("GET", "/admin-api/node")

    async def peers(self) -> Any:
        return await self.request("GET", "/admin-api/peers")

    async def connect(self, address: str) -> Any:
        return await self.request("POST", "/admin-api/peers", json={"address": address})

    async def metrics_text(self) -> str:
        try:
            response = await self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach node at {self._http.base_url}: {exc}") from None
        if response.is_error:
            raise ApiError(
                f"{response.status_code}: {response.reason_phrase}", response.status_code
            )
        return response.text


@asynccontextmanager
async def open_client(
    base_url: str, token: str, *, request_timeout: float = 30.0
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=request_timeout
    ) as http:
        yield Client(http)
