"""The inspector page in a real headless chromium: sign in, filter, replay, purge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from eventlog_helpers import Filled, fill
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from test_admin_api import TOKEN, gateway_app

from browser_helpers import chromium, click
from converge.extensions.connectors.server import AdminApp
from converge.extensions.storage import SQLiteStore
from loopback import UvicornThread


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Filled]]:
    store = SQLiteStore(tmp_path / "log.sqlite3", serializer="json")
    filled = anyio.run(fill, store)
    server = UvicornThread(gateway_app(AdminApp(filled.log, token=TOKEN))).start()
    try:
        yield server.url, filled
    finally:
        server.stop()
        store.close()


def ids(driver) -> list[str]:  # type: ignore[no-untyped-def]
    rows = driver.find_elements(By.CSS_SELECTOR, "tr.record")
    return [row.get_attribute("data-id") for row in rows]


def sign_in(driver, url: str) -> None:  # type: ignore[no-untyped-def]
    driver.get(url + "/admin/")
    assert driver.find_elements(By.ID, "records") == []  # nothing shown before signing in
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    click(driver, driver.find_element(By.ID, "sign-in"))


def test_sign_in_filter_replay_and_purge_in_a_browser(
    served: tuple[str, Filled], tmp_path: Path
) -> None:
    url, _ = served
    with chromium() as driver:
        driver.get(url + "/admin/")
        driver.find_element(By.ID, "token").send_keys("not-the-token-at-all")
        click(driver, driver.find_element(By.ID, "sign-in"))
        assert "not valid" in driver.find_element(By.CSS_SELECTOR, ".flash").text

        sign_in(driver, url)
        assert ids(driver) == ["evt_open", "evt_dead", "evt_ok"]
        Select(driver.find_element(By.ID, "filter-key")).select_by_value("github")
        click(driver, driver.find_element(By.ID, "apply-filters"))
        assert ids(driver) == ["evt_dead"]
        Select(driver.find_element(By.ID, "filter-key")).select_by_value("stripe")
        Select(driver.find_element(By.ID, "filter-status")).select_by_value("acknowledged")
        click(driver, driver.find_element(By.ID, "apply-filters"))
        assert ids(driver) == ["evt_ok"]

        click(driver, driver.find_element(By.ID, "nav-dead-letters"))
        assert sorted(ids(driver)) == ["dlv_dead", "evt_dead"]
        row = driver.find_element(By.CSS_SELECTOR, 'tr.record[data-id="dlv_dead"]')
        assert "HTTP 404" in row.text
        click(driver, row.find_element(By.CSS_SELECTOR, "button.replay"))
        assert "Replayed dlv_dead" in driver.find_element(By.ID, "flash").text
        assert ids(driver) == ["evt_dead"]

        click(driver, driver.find_element(By.ID, "nav-deliveries"))
        row = driver.find_element(By.CSS_SELECTOR, 'tr.record[data-id="dlv_dead"]')
        assert row.find_element(By.CSS_SELECTOR, "td.status").text == "pending"
        row.find_element(By.CSS_SELECTOR, "td.attempts summary").click()
        assert "status 503" in row.find_element(By.CSS_SELECTOR, "ol.attempts").text

        click(driver, driver.find_element(By.ID, "nav-dead-letters"))
        click(driver, driver.find_element(By.CSS_SELECTOR, 'tr.record[data-id="evt_dead"] .purge'))
        assert driver.find_elements(By.ID, "no-records")
        driver.save_screenshot(str(tmp_path / "inspector.png"))


def test_the_page_is_usable_on_a_phone(served: tuple[str, Filled]) -> None:
    url, _ = served
    with chromium(width=390, height=844) as driver:
        sign_in(driver, url)
        viewport = driver.find_element(By.CSS_SELECTOR, 'meta[name="viewport"]')
        assert "width=device-width" in viewport.get_attribute("content")
        table = driver.find_element(By.ID, "records")
        # No sideways scrolling: the table fits the screen (rows become cards).
        width = driver.execute_script("return document.documentElement.clientWidth")
        assert table.size["width"] <= width
        assert driver.find_element(By.CSS_SELECTOR, "thead").is_displayed() is False
        # Detail page of one event, with its signature header redacted.
        click(driver, driver.find_element(By.LINK_TEXT, "evt_ok"))
        page = driver.find_element(By.TAG_NAME, "pre").text
        assert '"webhook-signature": "[redacted]"' in page
