"""The dashboard in a real headless Chromium (selenium + chromedriver), served
by a real `dcmstatus serve` process over real NATS and PostgreSQL.

Without chromium and chromedriver the whole module skips with one line
saying how to get them. The page follows GET /api/v1/status-changes as an
event stream (its live mode, docs/dashboard.md#live-updates): the tests check
it is live, not polling, so a change shows without the polling fallback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
_DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:  # pragma: no cover - selenium is in the test extras
    _DRIVER = None
if not (_CHROMIUM and _DRIVER):
    pytest.skip(
        "browser tests need chromium, chromedriver and selenium: as root, apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_service import Running, publish, start_service  # noqa: E402

TOKEN = "dashboard-test-token"
WAIT = 30  # seconds a condition may take to show (a bound only: live changes show at once)


def _chrome(user_data_dir: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = _CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={user_data_dir}", "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=DriverService(executable_path=_DRIVER))


@pytest.fixture
def browser(tmp_path: Path):
    driver = _chrome(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def service(tmp_path, nats_url, database_url):
    running = start_service(tmp_path, nats_url, database_url)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def token_service(tmp_path, nats_url, database_url):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    running = start_service(tmp_path, nats_url, database_url, "--api-token-file", str(token_file))
    yield running
    assert running.stop() == 0, running.log()


def create(svc: Running, instance: str, service_type: str = "vm", **fields) -> None:
    status, body = svc.http(
        "POST", f"/api/v1/service-type-instances?id={instance}", {"service_type": service_type, "spec": {}, **fields}
    )
    assert status == 201, body


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message=f"waiting for {what}")


def table_rows(driver) -> list[list[str]]:
    # Read in one script: the page re-renders rows as changes arrive, so
    # element handles taken one by one could go stale between calls.
    return driver.execute_script(
        "return [...document.querySelectorAll('#instances tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))"
    )


def row_cells(driver, instance: str) -> list[str] | None:
    return next((cells for cells in table_rows(driver) if cells[0] == instance), None)


def text_of(driver, element_id: str) -> str:
    # In one script too: the counts table is rebuilt on every summary.
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : ''", element_id
    )


def connection_badge(driver) -> str:
    return text_of(driver, "connection")


def shown_ids(driver) -> list[str]:
    return [cells[0] for cells in table_rows(driver) if len(cells) > 1]


def test_a_row_turns_running_without_a_reload(service: Running, browser, tmp_path: Path):
    browser.get(service.http_url + "/")
    # The page follows GET /api/v1/status-changes as an event stream, not by polling.
    wait(browser, lambda d: connection_badge(d) == "live", "the live badge")
    browser.execute_script("window.__sameDocument = 'yes'")

    create(service, "vm1", name="web", provider_name="kubevirt")
    wait(browser, lambda d: row_cells(d, "vm1"), "the new row")
    assert row_cells(browser, "vm1")[4] == "PROVISIONING"

    publish(service.nats_url, "vm", "vm1", "Running", message="VM is running")
    wait(browser, lambda d: (row_cells(d, "vm1") or [""] * 7)[4] == "RUNNING", "the row to turn RUNNING")
    cells = row_cells(browser, "vm1")
    assert cells[5] == "VM is running"
    assert browser.execute_script(
        "return [...document.querySelectorAll('#instances tbody tr.flash td.id')].map(td => td.textContent)"
    ) == ["vm1"]
    # Counts follow, and the page was never reloaded.
    wait(browser, lambda d: "RUNNING" in text_of(d, "counts"), "the counts to show RUNNING")
    assert browser.execute_script("return window.__sameDocument") == "yes"
    assert connection_badge(browser) == "live", "the page fell back to polling"
    assert browser.find_element(By.ID, "health-state").text == "ok"
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 0


def test_filters_and_pages(service: Running, browser):
    for i in range(30):
        create(service, f"web-{i:02d}", provider_name="kubevirt")
    create(service, "db-1", service_type="container", provider_name="podman")
    create(service, "db-2", service_type="container", provider_name="podman")
    browser.get(service.http_url + "/")
    wait(browser, lambda d: len(shown_ids(d)) == 25, "the first page of 25")
    assert shown_ids(browser)[:2] == ["db-1", "db-2"]

    browser.find_element(By.ID, "next-page").click()
    wait(browser, lambda d: shown_ids(d) and shown_ids(d)[0] == "web-23", "the second page")
    assert len(shown_ids(browser)) == 7
    assert browser.find_element(By.ID, "next-page").get_attribute("disabled")
    browser.find_element(By.ID, "prev-page").click()
    wait(browser, lambda d: shown_ids(d)[:1] == ["db-1"], "the first page again")

    Select(browser.find_element(By.NAME, "service_type")).select_by_value("container")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(browser, lambda d: shown_ids(d) == ["db-1", "db-2"], "only containers")

    browser.find_element(By.CSS_SELECTOR, "#filters button[type=reset]").click()
    prefix = browser.find_element(By.NAME, "id_prefix")
    prefix.send_keys("web-1" + Keys.ENTER)  # Enter in a field submits: the form works from the keyboard
    wait(browser, lambda d: shown_ids(d) == [f"web-1{i}" for i in range(10)], "ids starting with web-1")

    browser.find_element(By.CSS_SELECTOR, "#filters button[type=reset]").click()
    provider = browser.find_element(By.NAME, "provider_name")
    provider.send_keys("podman" + Keys.ENTER)
    wait(browser, lambda d: shown_ids(d) == ["db-1", "db-2"], "only podman's")


def test_token_sign_in_keeps_the_token_in_an_httponly_cookie(token_service: Running, browser):
    create_status, _ = token_service.http("GET", "/api/v1/service-type-instances")
    assert create_status == 401
    browser.get(token_service.http_url + "/")
    field = browser.find_element(By.ID, "token")
    field.send_keys("not-the-token" + Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".login .error"), "the wrong-token message")
    assert browser.get_cookies() == []

    field = browser.find_element(By.ID, "token")
    field.send_keys(TOKEN + Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.ID, "dashboard"), "the dashboard")
    wait(browser, lambda d: d.find_element(By.ID, "health-state").text == "ok", "health")
    # The event stream is read with the cookie too (an EventSource sends no
    # Authorization header): the page is live, not polling.
    wait(browser, lambda d: connection_badge(d) == "live", "the live badge")
    (cookie,) = browser.get_cookies()
    assert cookie["name"] == "dcmstatus_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http here; over https it is Secure
    assert TOKEN not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""
    # The page's own API reads went through with the cookie (an empty table,
    # not a redirect to sign in), and no URL it asked for held the token.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#instances tbody td.empty"), "the empty table")
    urls = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name),"
        " ...performance.getEntriesByType('navigation').map(e => e.name)]"
    )
    assert urls and not [u for u in urls if TOKEN in u]

    browser.find_element(By.CSS_SELECTOR, ".signout button").click()
    wait(browser, lambda d: d.find_elements(By.ID, "token"), "the sign-in form again")
    assert browser.get_cookies() == []


XSS_SCRIPT = "<script>window.__xss = 'script'</script>"
XSS_IMG = "\"><img src=x onerror=\"window.__xss = 'img'\">"


def test_hostile_text_shows_literally_and_runs_nothing(service: Running, browser, tmp_path: Path):
    # The provider name is the event's source, as the provider sent it.
    create(service, "vm-xss", name=XSS_IMG)
    publish(service.nats_url, "vm", "vm-xss", "FAILED", message=XSS_IMG + XSS_SCRIPT, source=XSS_SCRIPT + XSS_IMG)
    browser.get(service.http_url + "/")
    wait(browser, lambda d: (row_cells(d, "vm-xss") or [""] * 7)[4] == "FAILED", "the hostile row")
    cells = row_cells(browser, "vm-xss")
    assert cells[2] == XSS_IMG
    assert cells[3] == XSS_SCRIPT + XSS_IMG
    assert cells[5] == XSS_IMG + XSS_SCRIPT
    # Changes arriving while the page is open go through the same path.
    publish(service.nats_url, "vm", "vm-xss", "RUNNING", message=XSS_SCRIPT, source=XSS_IMG)
    wait(browser, lambda d: (row_cells(d, "vm-xss") or [""] * 7)[4] == "RUNNING", "the live update")
    assert row_cells(browser, "vm-xss")[3] == XSS_IMG
    assert row_cells(browser, "vm-xss")[5] == XSS_SCRIPT
    assert browser.execute_script("return window.__xss") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#instances img, #instances script")
    browser.save_screenshot(str(tmp_path / "xss.png"))


def test_an_api_replicas_dashboard_goes_live_on_a_consumer_replicas_changes(tmp_path, nats_url, database_url, browser):
    from test_roles import start_role

    consumer = start_role(tmp_path, "consumer", "--role", "consumer", "--nats-url", nats_url, "--database-url", database_url)
    api = start_role(tmp_path, "api", "--role", "api", "--database-url", database_url)
    try:
        browser.get(api.http_url + "/")
        wait(browser, lambda d: connection_badge(d) == "live", "the live badge")
        create(api, "vm1")
        wait(browser, lambda d: row_cells(d, "vm1"), "the new row")
        publish(nats_url, "vm", "vm1", "Running")  # applied by the consumer replica
        wait(browser, lambda d: (row_cells(d, "vm1") or [""] * 7)[4] == "RUNNING", "the row to turn RUNNING")
        # Its health is the api role's; its own intake figures would be zeros, so the page says where they are.
        wait(browser, lambda d: "notifications" in text_of(d, "health"), "the api role's health")
        assert "nats" not in text_of(browser, "health")
        assert browser.find_element(By.ID, "intake-elsewhere").is_displayed()
    finally:
        assert api.stop() == 0, api.log()
        assert consumer.stop() == 0, consumer.log()


def test_the_intake_note_stays_hidden_on_a_replica_that_consumes(service: Running, browser):
    browser.get(service.http_url + "/")
    wait(browser, lambda d: "consumer" in text_of(d, "health"), "the health list")
    assert not browser.find_element(By.ID, "intake-elsewhere").is_displayed()
