"""The Content-Security-Policy header: on the pages, the admin and the login page in every settings module; looser
only for the styles of the API's library pages; and templates that give it nothing inline to refuse."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.test import Client

from labeling.models import Membership
from tests.factories import PairFactory, ProjectFactory, UserFactory

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIRS = [ROOT / "templates", ROOT / "labeling" / "templates", ROOT / "rewards" / "templates"]
STRICT = {
    "default-src": "'self'",
    "img-src": "'self' data:",
    "object-src": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}


def _policy(response) -> dict[str, str]:
    header = response.headers.get("Content-Security-Policy")
    assert header, f"no Content-Security-Policy on {response.request['PATH_INFO']}"
    return dict(re.split(r"\s+", part.strip(), maxsplit=1) for part in header.split(";") if part.strip())


@pytest.fixture
def members(db):
    project = ProjectFactory()
    PairFactory(project=project)
    labeler, manager = UserFactory(), UserFactory()
    Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    return project, labeler, manager


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.mark.django_db
def test_the_labeling_page_the_dashboard_the_login_page_and_the_admin_carry_the_strict_policy(members):
    project, labeler, manager = members
    admin = UserFactory(is_staff=True, is_superuser=True)
    pages = [
        (labeler, f"/projects/{project.slug}/label/"),
        (labeler, "/"),
        (manager, "/dashboard/"),
        (manager, f"/dashboard/{project.slug}/"),
        (None, "/accounts/login/"),
        (None, "/admin/login/"),
        (admin, "/admin/"),
        (admin, f"/admin/labeling/project/{project.pk}/change/"),
    ]
    for user, path in pages:
        response = _client(user).get(path)
        assert response.status_code == 200, path
        # No script-src or style-src: both fall back to default-src 'self', so nothing inline and no eval runs.
        assert _policy(response) == STRICT, path


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["no-debug", "debug"])
def test_the_labeling_panels_refusals_and_our_error_pages_carry_it_too(members, settings, debug):
    settings.DEBUG = debug
    project, labeler, _ = members
    client = _client(labeler)
    submit = f"/projects/{project.slug}/label/submit/"
    refused = client.post(submit, {"pair": "1", "choice": "sideways"}, HTTP_HX_REQUEST="true")
    unknown = client.post(submit, {"pair": "999999", "choice": "left"}, HTTP_HX_REQUEST="true")
    assert (refused.status_code, unknown.status_code) == (400, 404)
    assert b'id="pair-heading"' in refused.content and b'id="pair-heading"' in unknown.content
    assert _policy(refused) == _policy(unknown) == STRICT
    forbidden = client.get("/dashboard/")  # a labeler: our 403 page
    assert forbidden.status_code == 403 and _policy(forbidden) == STRICT


@pytest.mark.django_db
def test_djangos_own_debug_pages_are_left_without_it(settings):
    """Under DEBUG, Django's technical 404 and 500 pages style and script themselves inline; the policy would leave
    them unstyled with their tracebacks folded shut. Without DEBUG the same requests get our pages, with it."""
    settings.DEBUG = True
    not_found = Client().get("/nothing/here/")
    bad_host = Client().get("/accounts/login/", HTTP_HOST="elsewhere.example")  # a SuspiciousOperation: 400
    assert (not_found.status_code, bad_host.status_code) == (404, 400)
    assert b"<style" in not_found.content and b"<script" in bad_host.content
    assert "Content-Security-Policy" not in not_found.headers and "Content-Security-Policy" not in bad_host.headers
    settings.DEBUG = False
    assert _policy(Client().get("/nothing/here/")) == STRICT
    assert _policy(Client().get("/accounts/login/", HTTP_HOST="elsewhere.example")) == STRICT


@pytest.mark.django_db
def test_the_browsable_api_and_the_api_docs_may_style_inline_but_run_only_script_files(members):
    _, _, manager = members
    client = _client(manager)
    browsable = client.get("/api/v1/projects/", HTTP_ACCEPT="text/html")
    assert browsable.status_code == 200 and browsable["Content-Type"].startswith("text/html")
    # DRF's own markup (a <style> block of Pygments' colours, style="..." on forms and filters): why styles may be
    # inline here.
    assert "<style>" in browsable.content.decode() or 'style="' in browsable.content.decode()
    assert _policy(browsable) == {**STRICT, "style-src": "'self' 'unsafe-inline'"}

    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert _policy(docs) == {**STRICT, "style-src": "'self' 'unsafe-inline'"}
    scripts = _ScriptCollector.of(docs.content.decode())
    assert scripts and all(src for src, _ in scripts), scripts
    start_up = client.get(scripts[-1][0])
    assert start_up.status_code == 200 and start_up["Content-Type"].startswith("application/javascript")
    assert b"SwaggerUIBundle(" in start_up.content and b'"validatorUrl": null' in start_up.content


def test_every_settings_module_sends_the_policy(tmp_path):
    """Development and production alike: an inline script breaks on a developer's machine before it ships."""
    script = ("import django; django.setup(); from django.test import Client; "
              "print(Client().get('/accounts/login/', secure=True).headers.get('Content-Security-Policy'))")
    headers = {}
    for module in ("local", "production"):
        env = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": f"config.settings.{module}",
               "PREFLAB_VAR_DIR": str(tmp_path / module), "DJANGO_SECRET_KEY": "k" * 50}
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        headers[module] = result.stdout.strip().splitlines()[-1]
    expected = "; ".join(f"{directive} {sources}" for directive, sources in STRICT.items())
    assert headers == {"local": expected, "production": expected}


@pytest.mark.django_db
def test_htmx_is_told_to_add_no_style_block_to_settle_no_style_attribute_and_to_evaluate_nothing(members):
    """htmx 2 adds a <style> block for its request indicators and copies style attributes with setAttribute while it
    settles a swap; the policy refuses both (seen in the console on the run page, whose canvases Chart.js sizes)."""
    _, labeler, _ = members
    page = _client(labeler).get("/").content.decode()
    config = json.loads(re.search(r"<meta name=\"htmx-config\" content='([^']*)'>", page).group(1))
    assert config["includeIndicatorStyles"] is False
    assert config["allowEval"] is False
    assert "style" not in config["attributesToSettle"] and "class" in config["attributesToSettle"]


class _ScriptCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[str | None, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            found = dict(attrs)
            self.scripts.append((found.get("src"), found.get("type")))

    @classmethod
    def of(cls, html: str) -> list[tuple[str | None, str | None]]:
        parser = cls()
        parser.feed(html)
        return parser.scripts


class _InlineFinder(HTMLParser):
    """What a template would ask the policy to run or apply inline: script elements without a file (a JSON data
    block is not run), <style> blocks, style attributes, on* event handlers and javascript: links."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and not found.get("src") and found.get("type") != "application/json":
            self.found.append("<script> without src")
        if tag == "style":
            self.found.append("<style>")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"{name}= on <{tag}>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith(
                    "javascript:"):
                self.found.append(f"{name}=javascript: on <{tag}>")


def test_no_template_has_an_inline_script_event_handler_or_style():
    templates = [path for directory in TEMPLATE_DIRS for path in directory.rglob("*.html")]
    names = {str(path.relative_to(ROOT)) for path in templates}
    assert {"templates/base.html", "templates/registration/login.html", "labeling/templates/labeling/_panel.html",
            "labeling/templates/labeling/dashboard/project.html", "rewards/templates/rewards/_run_live.html"} <= names
    offenders = {}
    for path in templates:
        # Template tags and variables are left out: {% if %} around an attribute still leaves the attribute.
        text = re.sub(r"\{#.*?#\}|\{%.*?%\}", " ", path.read_text(), flags=re.S)
        text = re.sub(r"\{\{.*?\}\}", "x", text, flags=re.S)
        finder = _InlineFinder()
        finder.feed(text)
        if finder.found:
            offenders[str(path.relative_to(ROOT))] = finder.found
    assert offenders == {}
