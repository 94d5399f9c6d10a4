"""A small HTTPS client for the tests: log in to a Jupyter server and run code in a kernel.

It speaks to the real server the way a browser does: the login form with its
``_xsrf`` cookie, the REST API with the ``X-XSRFToken`` header, and the kernel's
websocket with the Jupyter message protocol.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid


class Jupyter:
    def __init__(self, url: str, context: ssl.SSLContext):
        self.url = url.rstrip("/")
        self.context = context
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), urllib.request.HTTPCookieProcessor(self.cookies), NoRedirect()
        )

    def request(self, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None):
        """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=dict(headers or {}))
        xsrf = self.cookie("_xsrf")
        if xsrf:
            request.add_header("X-XSRFToken", xsrf)
        try:
            with self.opener.open(request, timeout=30) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def login(self, password: str) -> tuple[int, bytes]:
        self.request("GET", "/login")
        form = urllib.parse.urlencode({"password": password, "_xsrf": self.cookie("_xsrf") or ""}).encode()
        status, _, body = self.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
        return status, body

    def execute(self, kernel_id: str, code: str, timeout: float = 90) -> str:
        """Run ``code`` in the kernel over its websocket; returns what it printed (raises on error)."""
        return asyncio.run(self._execute(kernel_id, code, timeout))

    async def _execute(self, kernel_id: str, code: str, timeout: float) -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = self.url.replace("https://", "wss://") + f"/api/kernels/{kernel_id}/channels"
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.cookies)
        request = HTTPRequest(ws_url, headers={"Cookie": cookie}, ssl_options=self.context)
        conn = await websocket_connect(request)
        msg_id = uuid.uuid4().hex
        conn.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                        "date": "",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        printed = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await conn.read_message()
                    if raw is None:
                        raise RuntimeError("the kernel's websocket closed")
                    msg = json.loads(raw)
                    if msg.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    kind, content = msg["msg_type"], msg["content"]
                    if kind == "stream":
                        printed.append(content["text"])
                    elif kind == "error":
                        raise RuntimeError("\n".join(content["traceback"]))
                    elif kind == "status" and content["execution_state"] == "idle":
                        return "".join(printed)
        finally:
            conn.close()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
