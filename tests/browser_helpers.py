"""Debian's headless chromium driven by Selenium through /usr/bin/chromedriver (no
downloads: Selenium Manager is kept offline)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[webdriver.Chrome]:
    """A headless chromium window of the given size."""
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def click(driver, element) -> None:  # type: ignore[no-untyped-def]
    """Click something that loads a new page, and wait until it has."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def replaced(_driver) -> bool:  # type: ignore[no-untyped-def]
        try:
            page.is_enabled()
        except WebDriverException:  # stale: the old document is gone
            return True
        return False

    WebDriverWait(driver, 10).until(replaced)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
