"""Browser fixtures: a headless Chromium per test, a page per test, form login and step screenshots."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connections

from tests.rewards.test_training_runs import training_worker  # noqa: F401  (a real Celery worker for the runs)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "browser"
PASSWORD = "correct-horse-battery"  # what tests.factories.UserFactory sets

# Applied by each browser test module: without the system Chromium (or the playwright package) there is
# nothing to drive, and the suite says so instead of failing.
requires_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)",
)


@pytest.fixture
def browser(live_server, monkeypatch) -> Iterator:
    """A Chromium per test: Playwright's sync API keeps an asyncio loop on the test's thread while it runs, and
    Django refuses ORM calls (the test's own setup and checks, all synchronous) while a loop is running. The
    switch that lifts that check is set only for as long as this browser lives, never for the other tests, and
    the live server (with the test database) comes up before the loop and goes down after it, so the database's
    own setup and teardown happen outside it."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (requirements.txt)")
    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
            # While the loop runs, Django keeps the test's database connections apart from the thread's usual
            # ones (asgiref's context-local storage); closed here, or they outlive the test database.
            connections.close_all()


# How Chromium words a refusal by the Content-Security-Policy in the console.
CSP_VIOLATION = re.compile(r"Content Security Policy", re.IGNORECASE)


@pytest.fixture
def page(browser, live_server, request) -> Iterator:
    context = browser.new_context(base_url=live_server.url, accept_downloads=True,
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    violations: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: violations.append(message.text)
            if CSP_VIOLATION.search(message.text) else None)
    try:
        yield page
    finally:
        context.close()
    # A script that throws on any page visited is a bug even when the journey itself got through, and so is
    # anything the policy refused on the way (a script or style the page needed that did not apply).
    assert not errors, f"JavaScript errors: {errors}"
    if request.node.get_closest_marker("csp_violation_expected") is None:
        assert not violations, f"Content-Security-Policy violations: {violations}"


@pytest.fixture
def shot(page, request) -> Callable[[str], Path]:
    """shot("step") saves a full-page screenshot as test-output/browser/<test>--<nn>-<step>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    test_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    for old in SCREENSHOTS.glob(f"{test_name}--*.png"):
        old.unlink()
    counter = iter(range(1, 1000))

    def take(step: str) -> Path:
        path = SCREENSHOTS / f"{test_name}--{next(counter):02d}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


def login(page, shot: Callable[[str], Path], *, username: str, next_path: str) -> None:
    """Log in through the login form, arriving at `next_path`."""
    page.goto(f"/accounts/login/?next={next_path}")
    shot("login-form")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"**{next_path}")
