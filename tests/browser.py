"""A real headless Chromium for the console's browser tests: where it is, how it starts
(offline, with a throwaway profile), and a small async face over Selenium's blocking calls.

Selenium blocks the thread that calls it, and the apps under test serve from the test's event
loop: every browser call therefore runs in a worker thread (`asyncio.to_thread`) while the
loop keeps serving the pages the browser asks for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

# The terminal summary looks for this prefix (tests/conftest.py) to print it as a banner.
SKIP_PREFIX: Final = "BROWSER TESTS SKIPPED"
INSTALL_HINT: Final = (
    "install chromium and chromium-driver (apt-get install chromium chromium-driver)"
)
# Set by .ci/run: there a missing browser fails the browser tests instead of skipping them.
REQUIRE_ENV: Final = "WALLET_REQUIRE_BROWSER"
WINDOW: Final = (1280, 900)
# How long a page may take to load after a click (a bound, not a pause: loads end sooner).
LOAD_WAIT_S: Final = 10.0
# Headless, as root, in a container, on a machine without internet: no sandbox (root), no
# /dev/shm (small in containers), and none of the background calls to Google's services that
# would only fail. A fresh profile per browser: no state leaks between runs.
FLAGS: Final = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)

T = TypeVar("T")


@dataclass(frozen=True)
class Chromium:
    binary: str
    driver: str


def locate() -> Chromium | None:
    """The Chromium and the matching chromedriver on PATH (Debian's `chromium` and
    `chromium-driver` packages), or None when either is missing."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        return None
    return Chromium(binary, driver)


def missing_reason() -> str:
    return f"{SKIP_PREFIX}: no chromium/chromedriver on PATH; {INSTALL_HINT}"


def require() -> Chromium:
    """The browser, or a skip (a failure when REQUIRE_ENV is set, as in CI)."""
    found = locate()
    if found is not None:
        return found
    if os.environ.get(REQUIRE_ENV, "").lower() in {"1", "true", "yes"}:
        pytest.fail(
            f"{REQUIRE_ENV} is set and no chromium/chromedriver is on PATH; {INSTALL_HINT}",
            pytrace=False,
        )
    pytest.skip(missing_reason())


def skipped_banner(skipped: Iterable[Any]) -> str | None:
    """The banner for the terminal summary when some browser test was skipped for want of a
    browser (`skipped`: pytest's skipped reports), else None."""
    for report in skipped:
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and SKIP_PREFIX in str(longrepr[-1]):
            return f"{SKIP_PREFIX}: {INSTALL_HINT}"
    return None


@contextmanager
def started(found: Chromium) -> Iterator[WebDriver]:
    """A headless Chromium driven by chromedriver, closed on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = found.binary
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="wallet-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    # Both paths given and SE_OFFLINE set: selenium-manager never looks for (or downloads)
    # a browser or a driver.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(found.driver), options=options)
    # Selenium logs every WebDriver call with whole page sources at DEBUG: a failing test's
    # report would drown in them.
    quiet = [logging.getLogger(name) for name in ("selenium", "urllib3")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.INFO)
    try:
        driver.set_page_load_timeout(LOAD_WAIT_S)
        # The page itself WINDOW large (a headless window's own frame would take its share).
        width, height = WINDOW
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


class Browser:
    """One browser on one site: paths are relative to `base_url`; every call is awaited."""

    def __init__(self, driver: WebDriver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url.rstrip("/")

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # Navigation

    async def open(self, path: str) -> None:
        await self._run(self.driver.get, self.base_url + path)

    async def path(self) -> str:
        """The current page's path and query (after any redirects)."""
        url: str = await self._run(lambda: self.driver.current_url)
        return url.removeprefix(self.base_url)

    async def source(self) -> str:
        return await self._run(lambda: self.driver.page_source)

    # Reading the page

    async def text(self, css: str) -> str:
        """The visible text of the one element `css` names (fails when there is none)."""
        return await self._run(lambda: self._find(css).text)

    async def texts(self, css: str) -> list[str]:
        return await self._run(
            lambda: [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]
        )

    async def count(self, css: str) -> int:
        return await self._run(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, css)))

    async def attribute(self, css: str, name: str) -> str | None:
        return await self._run(lambda: self._find(css).get_attribute(name))

    async def link_to(self, table_css: str, text: str) -> str:
        """The path of the link whose text is `text` in a table (a list page's row)."""

        def find() -> str:
            for link in self.driver.find_elements(By.CSS_SELECTOR, f"{table_css} a[href]"):
                if link.text.strip() == text:
                    return str(link.get_attribute("href")).removeprefix(self.base_url)
            raise AssertionError(f"no link {text!r} in {table_css}")

        return await self._run(find)

    def _find(self, css: str) -> WebElement:
        try:
            return self.driver.find_element(By.CSS_SELECTOR, css)
        except NoSuchElementException:
            raise AssertionError(f"no {css} on {self._where()}") from None

    def _where(self) -> str:
        """The current page, for a failure's message: its URL, title and first heading."""
        headings = self.driver.find_elements(By.CSS_SELECTOR, "h1, p.error")
        said = " / ".join(h.text for h in headings[:2])
        return f"{self.driver.current_url} ({self.driver.title}: {said})"

    # Forms

    async def fill(self, form: str, fields: Mapping[str, str | bool]) -> None:
        """Type into a form as a user would: text inputs and textareas are cleared and typed
        into, selects pick the option with that value, a checkbox is set to the bool given
        (or, for a group of checkboxes sharing a name, the box with that value is ticked)."""
        await self._run(self._fill, form, fields)

    def _fill(self, css: str, fields: Mapping[str, str | bool]) -> None:
        form = self._find(css)
        for name, value in fields.items():
            boxes = form.find_elements(By.CSS_SELECTOR, f'input[type="checkbox"][name="{name}"]')
            if boxes and isinstance(value, bool):
                _set_checked(boxes[0], value)
                continue
            if boxes:
                box = form.find_element(By.CSS_SELECTOR, f'[name="{name}"][value="{value}"]')
                _set_checked(box, True)
                continue
            element = form.find_element(By.NAME, name)
            if element.tag_name == "select":
                Select(element).select_by_value(str(value))
            else:
                element.clear()
                element.send_keys(str(value))

    async def submit(self, form: str) -> None:
        """Click the form's submit button (accepting its confirmation, if it asks one) and
        wait for the next page."""
        await self._run(self._submit, form)

    def _submit(self, css: str) -> None:
        form = self._find(css)
        confirms = form.get_attribute("data-confirm")
        old_page = self.driver.find_element(By.TAG_NAME, "html")
        form.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()
        if confirms:
            try:
                WebDriverWait(self.driver, LOAD_WAIT_S).until(
                    expected_conditions.alert_is_present()
                )
                self.driver.switch_to.alert.accept()
            except (TimeoutException, NoAlertPresentException) as exc:
                raise AssertionError(f"{css} asked no confirmation: {confirms!r}") from exc
        self._wait_for_new_page(old_page)

    async def post_form(self, action: str, fields: Mapping[str, str]) -> None:
        """Build a form in the page with just `fields` and submit it, the way another site (or
        a script slipped into a page) would try to. WebDriver's scripts run outside the page's
        CSP; the page's own scripts could not."""
        await self._run(self._post_form, action, dict(fields))

    def _post_form(self, action: str, fields: dict[str, str]) -> None:
        old_page = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.execute_script(
            """
            const form = document.createElement("form");
            form.method = "post";
            form.action = arguments[0];
            for (const [name, value] of Object.entries(arguments[1])) {
              const input = document.createElement("input");
              input.type = "hidden";
              input.name = name;
              input.value = value;
              form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
            """,
            action,
            fields,
        )
        self._wait_for_new_page(old_page)

    def _wait_for_new_page(self, old_page: WebElement) -> None:
        WebDriverWait(self.driver, LOAD_WAIT_S).until(lambda _: _gone(old_page))
        WebDriverWait(self.driver, LOAD_WAIT_S).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )

    # Waiting (bounded) for something the server does in the background

    async def reload_until(
        self,
        path: str,
        ready: Callable[[], Awaitable[bool]],
        within_s: float = 10.0,
        show: str = "main",
    ) -> None:
        """Open `path` again and again until `ready()` says so, for at most `within_s`; a
        failure shows the text of `show` as last seen."""
        deadline = time.monotonic() + within_s
        while True:
            await self.open(path)
            if await ready():
                return
            if time.monotonic() > deadline:
                seen = await self._run(self._seen, show)
                raise AssertionError(f"{path} never got ready within {within_s} s: {seen}")
            await asyncio.sleep(0.2)

    def _seen(self, css: str) -> str:
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return repr(found[0].text[:1000]) if found else f"no {css} on {self._where()}"

    # Pictures

    async def screenshot(self, target: Path, *, full_page: bool = False) -> None:
        def save() -> None:
            # Once the stylesheet has loaded, and with no field focused (no caret, no ring).
            WebDriverWait(self.driver, LOAD_WAIT_S).until(
                lambda d: d.execute_script("return document.readyState") == "complete"
            )
            self.driver.execute_script("document.activeElement?.blur()")
            width, height = WINDOW
            if full_page:  # the page as tall as its content, for one picture of all of it
                height = int(self.driver.execute_script("return document.body.scrollHeight"))
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            try:
                assert self.driver.save_screenshot(str(target)), f"could not write {target}"
            finally:
                metrics["height"] = WINDOW[1]
                self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)

        await self._run(save)

    async def forget_cookies(self) -> None:
        """Sign out of everything: cookies ignore ports, and every test's apps live on
        127.0.0.1."""
        await self._run(self.driver.execute_cdp_cmd, "Network.clearBrowserCookies", {})


def _gone(element: WebElement) -> bool:
    """Whether the page that held `element` has been replaced. (Mid-navigation, Chromium may
    say so with a generic error instead of a stale element.)"""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc.msg):
            return True
        raise
    return False


def _set_checked(box: WebElement, checked: bool) -> None:
    if box.is_selected() != checked:
        box.click()
