"""The rating web app (FastAPI): a page per rater, the next task as JSON, votes as JSON POSTs, images by key.

Who may do what:
- every request names the rater's secret token in its path; an unknown token is a 404 (nothing says whether a
  study exists);
- a vote must name a pair of the rater's own study, one of its questions and `left` or `right`, for a task that
  was shown to this rater; anything else is a 4xx and writes nothing;
- images are looked up by key among the study's own pairs, and their stored path must resolve inside the run
  folder: no path from the request is ever opened;
- POSTs are JSON only (a cross-site HTML form cannot send that without a CORS preflight, which this app never
  answers), must carry the rater's CSRF value (an HMAC of the token under the study's secret) in X-Probe-CSRF,
  and a present Origin must be this server's own;
- Host headers are checked (TrustedHostMiddleware), so a DNS-rebinding page cannot reach a loopback server;
- pages send a Content-Security-Policy that allows nothing remote, and no Referer (links carry tokens);
- a study that includes images a safety detector flagged says so on every rater's page before any image.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from probe.rate.study import QUESTIONS, flagged_shown, left_is_a, task_order
from probe.store.votes import Study, VoteStore

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
MAX_BODY = 4096


class Vote(BaseModel):
    """A vote as the page posts it."""

    model_config = ConfigDict(extra="forbid")
    pair: int = Field(ge=0)
    question: str = Field(max_length=32)
    choice: str = Field(pattern="^(left|right)$")


class Join(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w .@-]+$")


def csrf_value(study: Study, token: str) -> str:
    return hmac.new(study.secret.encode(), f"csrf:{token}".encode(), hashlib.sha256).hexdigest()


def join_value(study: Study) -> str:
    return hmac.new(study.secret.encode(), b"join", hashlib.sha256).hexdigest()


class Rating:
    """What the routes share: the store, the study's pairs (fixed once created) and the page templates."""

    def __init__(self, run_dir: Path, study_id: str, flagged: Collection[str] = ()) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.store = VoteStore(self.run_dir)
        self.study = self.store.study(study_id)
        self.pairs = {p.pair: p for p in self.store.pairs(study_id)}
        self.images = {key: path for p in self.pairs.values() for key, path in ((p.a_key, p.a_path),
                                                                                 (p.b_key, p.b_path))}
        self.n_flagged = flagged_shown(self.pairs.values(), flagged)
        """Images of the study a safety detector flagged (a study that includes them): the pages warn raters."""
        self.templates = Environment(loader=PackageLoader("probe.rate", "templates"),
                                     autoescape=select_autoescape(default=True))

    def rater(self, token: str) -> str:
        found = self.store.rater_of(token) if len(token) <= 128 else None
        if found is None or found[0] != self.study.id:
            raise HTTPException(404, "unknown rater link")
        return found[1]

    def next_task(self, rater: str) -> dict[str, Any]:
        tasks = task_order(self.study, rater, list(self.pairs.values()))
        done = self.store.answered(self.study.id, rater)
        progress = {"answered": len(done & set(tasks)), "total": len(tasks)}
        for pair_id, question in tasks:
            if (pair_id, question) not in done:
                pair = self.pairs[pair_id]
                a_left = left_is_a(self.study, rater, pair_id)
                left, right = (pair.a_key, pair.b_key) if a_left else (pair.b_key, pair.a_key)
                self.store.show(self.study.id, rater, pair_id, question, left)
                return {"done": False, "progress": progress,
                        "task": {"pair": pair_id, "question": question, "text": QUESTIONS[question],
                                 "prompt": pair.prompt, "left": left, "right": right}}
        return {"done": True, "progress": progress, "task": None}

    def image_path(self, key: str) -> Path:
        relative = self.images.get(key)
        if relative is None:
            raise HTTPException(404, "no such image in this study")
        path = (self.run_dir / relative).resolve()
        if not path.is_relative_to(self.run_dir) or not path.is_file():
            raise HTTPException(404, "image missing from the run folder")
        return path


def create_app(run_dir: Path, study_id: str, allowed_hosts: list[str], flagged: Collection[str] = ()) -> FastAPI:
    """The app for one study of one run folder; `flagged`: the run's image keys a safety detector flagged."""
    rating = Rating(run_dir, study_id, flagged)
    app = FastAPI(title="probe rate", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(packages=[("probe.rate", "static")]), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if request.method == "POST":
            problem = _post_problem(request)
            if problem:
                return JSONResponse({"detail": problem}, status_code=problem_status(problem), headers=HEADERS)
        response: Response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def page(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(rating.templates.get_template(name).render(study=rating.study,
                                                                       n_flagged=rating.n_flagged, **context))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in every rater's console

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        if not rating.study.open:
            return page("closed.html.j2")
        return page("join.html.j2", join=join_value(rating.study))

    @app.post("/join")
    def join(body: Join, request: Request) -> JSONResponse:
        if not rating.study.open:
            raise HTTPException(404, "this study takes raters by link only")
        _check_csrf(request, join_value(rating.study))
        token = rating.store.add_rater(rating.study.id, body.name.strip(), secrets.token_urlsafe(24))
        return JSONResponse({"url": f"/r/{token}"})

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rate_page(token: str) -> HTMLResponse:
        rater = rating.rater(token)
        return page("rate.html.j2", rater=rater, token=token, csrf=csrf_value(rating.study, token))

    @app.get("/r/{token}/next")
    def next_task(token: str) -> dict[str, Any]:
        return rating.next_task(rating.rater(token))

    @app.post("/r/{token}/vote")
    def vote(token: str, body: Vote, request: Request) -> dict[str, Any]:
        rater = rating.rater(token)
        _check_csrf(request, csrf_value(rating.study, token))
        pair = rating.pairs.get(body.pair)
        if pair is None:
            raise HTTPException(422, f"pair {body.pair} is not in this study")
        if body.question not in rating.study.questions:
            raise HTTPException(422, f"question {body.question!r} is not asked in this study")
        shown = rating.store.shown(rating.study.id, rater, pair.pair, body.question)
        if shown is None:
            raise HTTPException(409, "this task was not shown to you yet")
        added = rating.store.vote(rating.study.id, rater, pair, body.question, body.choice, shown[0], shown[1])
        return {"stored": True, "duplicate": not added, **rating.next_task(rater)}

    @app.get("/r/{token}/image/{key}")
    def image(token: str, key: str) -> FileResponse:
        rating.rater(token)
        return FileResponse(rating.image_path(key), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/r/{token}/done", response_class=HTMLResponse)
    def done(token: str) -> HTMLResponse:
        rater = rating.rater(token)
        return page("done.html.j2", rater=rater)

    @app.get("/r/{token}/", include_in_schema=False)
    def trailing(token: str) -> RedirectResponse:
        return RedirectResponse(f"/r/{token}")

    return app


def _post_problem(request: Request) -> str | None:
    """Why a POST is refused before any route runs, or None."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return "votes are JSON (Content-Type: application/json)"
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return "request body too large"
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        return "cross-origin request refused"
    return None


def problem_status(problem: str) -> int:
    return 413 if "large" in problem else 415 if "JSON" in problem else 403


def _check_csrf(request: Request, expected: str) -> None:
    if not hmac.compare_digest(request.headers.get("x-probe-csrf", ""), expected):
        raise HTTPException(403, "missing or wrong X-Probe-CSRF value: reload the page")
