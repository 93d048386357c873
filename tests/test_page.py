"""The search page in a real browser: Debian's chromium, headless, driven by Selenium through chromedriver.

These tests fail (they do not skip) when chromium or chromedriver is missing: install them with
`apt-get install -y chromium chromium-driver`.
"""

from __future__ import annotations

import json
import os
import shutil
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from search_index import build_small_index, running_server

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900")
WAIT_S = 30
# The page's "hide near-duplicates" threshold for this index: a random ResNet embeds every pair of these images
# above 0.998, so the default 0.95 would leave one result; this one hides some and keeps most.
PAGE_DEDUP = 0.99995


def find_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if chromium is None or driver is None:
        pytest.fail("the page tests need Debian's chromium and chromedriver: apt-get install -y chromium "
                    "chromium-driver", pytrace=False)
    return chromium, driver


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("page"), count=60)


@pytest.fixture(scope="module")
def server(built):
    from clipforge import Searcher
    from clipforge.search.server import create_app

    searcher = Searcher(built.index_dir)
    with running_server(create_app(searcher, dedup=PAGE_DEDUP)) as base:
        yield base, searcher


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(browser, condition, message: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a condition reading the result cards while the page replaces them sees stale elements: look again
    return WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(condition,
                                                                                                     message)


def card_ids(browser) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(card.get_attribute("data-id")) for card in browser.find_elements(By.CSS_SELECTOR, "#results .card")]


def wait_status(browser, fragment: str) -> str:
    from selenium.webdriver.common.by import By

    wait_for(browser, lambda d: fragment in d.find_element(By.ID, "status").text,
             f"status never showed {fragment!r}")
    return browser.find_element(By.ID, "status").text


def test_page_loads_and_shows_the_index(server, browser):
    from selenium.webdriver.common.by import By

    base, _ = server
    browser.get(base + "/")
    assert browser.title == "clipforge search"
    wait_for(browser, lambda d: "60 images" in d.find_element(By.ID, "info").text, "index info never shown")
    assert not browser.find_element(By.ID, "index").is_displayed()  # one index: no menu
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_typed_query_shows_results_and_goes_into_the_url(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, searcher = server
    browser.get(base + "/")
    box = browser.find_element(By.ID, "query")
    box.send_keys("a red circle", Keys.ENTER)
    wait_status(browser, "12 results for")
    expected = [h["id"] for h in searcher.search(text="a red circle", k=12)["results"]]
    assert card_ids(browser) == expected
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert first.find_element(By.CSS_SELECTOR, ".caption").text  # captions shown
    image_ok = browser.execute_script("const i = document.querySelector('#results .card img');"
                                      "return i.complete && i.naturalWidth > 0;")
    wait_for(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#results .card img'); return i.complete && i.naturalWidth > 0;"),
        "the first result's image never loaded") if not image_ok else None
    src = urlparse(first.find_element(By.CSS_SELECTOR, "img").get_attribute("src"))
    assert src.path == f"/api/image/{expected[0]}" and parse_qs(src.query)["size"] == ["384"]  # a preview (dpr 1)
    query = parse_qs(urlparse(browser.current_url).query)
    assert query["q"] == ["a red circle"] and query["k"] == ["12"]
    # the shared URL reproduces the search
    browser.get(base + "/?q=a%20green%20star&k=24")
    wait_status(browser, "24 results for")
    assert browser.find_element(By.ID, "query").get_attribute("value") == "a green star"
    assert card_ids(browser) == [h["id"] for h in searcher.search(text="a green star", k=24)["results"]]


def test_shared_url_with_an_unusual_k(server, browser):
    base, searcher = server
    browser.get(base + "/?q=a%20red%20circle&k=5")
    wait_status(browser, "5 results for")
    assert card_ids(browser) == [h["id"] for h in searcher.search(text="a red circle", k=5)["results"]]


def test_clicking_a_result_searches_by_it(server, browser):
    from selenium.webdriver.common.by import By

    base, searcher = server
    browser.get(base + "/?q=a%20blue%20square&k=12")
    wait_status(browser, "12 results for")
    target = card_ids(browser)[2]
    browser.find_elements(By.CSS_SELECTOR, "#results .card")[2].click()
    wait_status(browser, f"images like #{target}")
    assert card_ids(browser) == [h["id"] for h in searcher.search_by_id(target, k=12)["results"]]
    assert parse_qs(urlparse(browser.current_url).query)["id"] == [str(target)]
    # the keyboard does the same: a result takes the focus (it is in the Tab order), Enter searches by it
    from selenium.webdriver.common.keys import Keys

    second = card_ids(browser)[1]
    card = browser.find_elements(By.CSS_SELECTOR, "#results .card")[1]
    browser.execute_script("arguments[0].focus();", card)
    assert browser.switch_to.active_element == card
    card.send_keys(Keys.ENTER)
    wait_status(browser, f"images like #{second}")
    assert card_ids(browser) == [h["id"] for h in searcher.search_by_id(second, k=12)["results"]]


def test_uploaded_image_shows_results_and_classifies(server, browser, built):
    from selenium.webdriver.common.by import By

    base, searcher = server
    browser.get(base + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(built.paths[5]))
    wait_status(browser, "12 results for the image")
    assert card_ids(browser) == [h["id"] for h in searcher.search(image=built.paths[5], k=12)["results"]]
    assert browser.find_element(By.ID, "query-image").is_displayed()
    labels = browser.find_element(By.ID, "labels")
    labels.send_keys("a red circle, a blue square")
    browser.find_element(By.ID, "classify-button").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classify-results li")) == 2,
             "classification never shown")
    rows = browser.find_elements(By.CSS_SELECTOR, "#classify-results li")
    expected = searcher.classify(built.paths[5], ["a red circle", "a blue square"])
    assert [r.text.split("\n")[0] for r in rows] == [e["label"] for e in expected]


DISPATCH_IMAGE = """
const [kind, done] = [arguments[0], arguments[arguments.length - 1]];
fetch('/api/image/5').then(r => r.blob()).then(blob => {
  const data = new DataTransfer();
  data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
  const event = kind === 'drop' ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
                                : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
  (kind === 'drop' ? document.getElementById('drop-zone') : document).dispatchEvent(event);
  done(true);
});
"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_dropped_or_pasted_image_shows_results(server, browser, built, kind):
    base, searcher = server
    browser.get(base + "/")
    browser.set_script_timeout(WAIT_S)
    assert browser.execute_async_script(DISPATCH_IMAGE, kind) is True
    wait_status(browser, "12 results for the image")
    assert card_ids(browser) == [h["id"] for h in searcher.search(image=built.paths[5], k=12)["results"]]


def test_no_good_match_notice(server, browser):
    from selenium.webdriver.common.by import By

    base, searcher = server
    saved = searcher.threshold
    searcher.threshold = 2.0  # above any cosine: every text query is "no good match"
    try:
        browser.get(base + "/?q=a%20red%20circle")
        wait_status(browser, "12 results for")
        notice = browser.find_element(By.ID, "no-match")
        assert notice.is_displayed() and "No good match" in notice.text and "2.000" in notice.text
    finally:
        searcher.threshold = saved
    browser.get(base + "/?q=a%20red%20circle")
    wait_status(browser, "12 results for")
    shown = browser.find_element(By.ID, "no-match").is_displayed()
    assert shown == searcher.search(text="a red circle", k=12)["no_good_match"]


def test_bad_query_shows_the_error(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, _ = server
    browser.get(base + "/")
    browser.find_element(By.ID, "query").send_keys("word " * 100, Keys.ENTER)
    assert "tokens long" in wait_status(browser, "tokens long")
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


def test_hide_near_duplicates_and_download_the_answer(server, browser):
    import httpx
    from selenium.webdriver.common.by import By

    base, searcher = server
    browser.get(base + "/?q=a%20red%20circle&k=12")
    wait_status(browser, "12 results for")
    wait_for(browser, lambda d: str(PAGE_DEDUP) in d.find_element(By.ID, "dedup-label").get_attribute("title"),
             "the server's dedup threshold never reached the page")
    browser.find_element(By.ID, "dedup").click()
    expected = searcher.search(text="a red circle", k=12, dedup=PAGE_DEDUP)
    assert expected["hidden"] > 0
    wait_status(browser, f"({expected['hidden']} near-duplicates hidden)")
    assert card_ids(browser) == [h["id"] for h in expected["results"]]
    badges = {int(card.get_attribute("data-id")): card.find_elements(By.CSS_SELECTOR, ".dups")
              for card in browser.find_elements(By.CSS_SELECTOR, "#results .card")}
    for hit in expected["results"]:
        shown = [b.text for b in badges[hit["id"]]]
        assert shown == ([f"+{len(hit['duplicates'])}"] if hit["duplicates"] else [])
    assert parse_qs(urlparse(browser.current_url).query)["dedup"] == [str(PAGE_DEDUP)]
    # the download is the API's answer, exactly
    link = browser.find_element(By.ID, "download")
    head, _, payload = link.get_attribute("href").partition(",")
    assert head == "data:application/json;charset=utf-8" and link.get_attribute("download").endswith(".json")
    api = httpx.get(base + "/api/search", params={"text": "a red circle", "k": 12, "dedup": PAGE_DEDUP}).json()
    assert json.loads(unquote(payload)) == api and link.is_displayed()
    # a shared URL with dedup reproduces it, with the toggle on
    browser.get(base + f"/?q=a%20red%20circle&k=12&dedup={PAGE_DEDUP}")
    wait_status(browser, "near-duplicates hidden")
    assert browser.find_element(By.ID, "dedup").is_selected()
    assert card_ids(browser) == [h["id"] for h in expected["results"]]


@pytest.fixture(scope="module")
def two_indices(server, tmp_path_factory):
    """A server of two indices: `first` (the page tests' index, the default) and `second` (another model)."""
    from clipforge import Searcher
    from clipforge.search.server import create_app

    _, first = server
    second = Searcher(build_small_index(tmp_path_factory.mktemp("page-second"), count=24, seed=1).index_dir)
    with running_server(create_app({"first": first, "second": second}, dedup=PAGE_DEDUP)) as base:
        yield base, first, second


def test_choosing_an_index(two_indices, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, first, second = two_indices
    browser.get_log("browser")  # drain the earlier tests' messages (a 400 of the bad-query test)
    browser.get(base + "/?index=second&q=a%20red%20circle&k=12")
    wait_status(browser, "12 results for")
    menu = browser.find_element(By.ID, "index")
    wait_for(browser, lambda d: menu.is_displayed() and menu.get_attribute("value") == "second",
             "the index menu never showed the URL's index")
    assert card_ids(browser) == [h["id"] for h in second.search(text="a red circle", k=12)["results"]]
    wait_for(browser, lambda d: d.find_element(By.ID, "info").text.startswith("second · 24 images"),
             "the info line never described the chosen index")
    src = browser.find_element(By.CSS_SELECTOR, "#results .card img").get_attribute("src")
    assert parse_qs(urlparse(src).query)["index"] == ["second"]
    # clicking a result searches that index by the result's id
    target = card_ids(browser)[1]
    browser.find_elements(By.CSS_SELECTOR, "#results .card")[1].click()
    wait_status(browser, f"images like #{target}")
    assert card_ids(browser) == [h["id"] for h in second.search_by_id(target, k=12)["results"]]
    assert parse_qs(urlparse(browser.current_url).query)["index"] == ["second"]
    # switching to the default index reruns the typed query there and drops index= from the URL
    Select(menu).select_by_value("first")
    wait_for(browser, lambda d: card_ids(d) == [h["id"] for h in first.search(text="a red circle", k=12)["results"]],
             "switching index never showed the first index's results")
    assert "index" not in parse_qs(urlparse(browser.current_url).query)
    assert browser.find_element(By.ID, "info").text.startswith("first · 60 images")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_match_captions_toggle(server, browser):
    from selenium.webdriver.common.by import By

    base, searcher = server
    browser.get(base + "/?q=a%20red%20circle&k=12")
    wait_status(browser, "12 results for")
    browser.find_element(By.ID, "captions").click()
    wait_status(browser, "matched against captions")
    expected = searcher.search(text="a red circle", k=12, modality="text")
    assert card_ids(browser) == [h["id"] for h in expected["results"]]
    assert parse_qs(urlparse(browser.current_url).query)["modality"] == ["text"]
    browser.get(base + "/?q=a%20red%20circle&k=12&modality=text")  # a shared URL keeps it
    wait_status(browser, "matched against captions")
    assert browser.find_element(By.ID, "captions").is_selected()
    assert card_ids(browser) == [h["id"] for h in expected["results"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A server over an index of 30 images in three subfolders (keys g0/…, g1/…, g2/…)."""
    from clipforge import Searcher
    from clipforge.search.server import create_app

    searcher = Searcher(build_small_index(tmp_path_factory.mktemp("page-folders"), count=30, subfolders=3).index_dir)
    with running_server(create_app(searcher)) as base:
        yield base, searcher


def test_in_folder_field(folders, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, searcher = folders
    browser.get(base + "/?q=a%20red%20circle&k=12")
    wait_status(browser, "12 results for")
    browser.find_element(By.ID, "under").send_keys("g1", Keys.ENTER)
    wait_status(browser, "10 results for “a red circle” under g1")  # the folder holds 10: k counts them alone
    expected = searcher.search(text="a red circle", k=12, under="g1")
    assert card_ids(browser) == [h["id"] for h in expected["results"]]
    assert parse_qs(urlparse(browser.current_url).query)["under"] == ["g1"]
    browser.get(base + "/?q=a%20red%20circle&k=5&under=g2")  # a shared URL keeps it
    wait_status(browser, "5 results for “a red circle” under g2")
    assert browser.find_element(By.ID, "under").get_attribute("value") == "g2"
    assert card_ids(browser) == [h["id"] for h in searcher.search(text="a red circle", k=5, under="g2")["results"]]
    first = card_ids(browser)[0]
    browser.get(base + f"/?id={first}&k=4&under=g0")  # images like one of g2, among g0's
    wait_status(browser, f"4 results for images like #{first} under g0")
    assert card_ids(browser) == [h["id"] for h in searcher.search_by_id(first, k=4, under="g0")["results"]]
    field = browser.find_element(By.ID, "under")
    field.clear()
    field.send_keys("g7", Keys.ENTER)
    wait_status(browser, "under g7: no image of the index lies under it")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("400" in e for e in errors), errors  # the refused request, logged by the browser, and nothing else


def test_shift_and_alt_click_add_results_to_the_query(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from clipforge.search.query import parse_query

    base, searcher = server
    browser.get(base + "/?q=a%20red%20circle&k=12")
    wait_status(browser, "12 results for")
    first = card_ids(browser)[0]
    card = browser.find_element(By.CSS_SELECTOR, f'#results .card[data-id="{first}"]')
    ActionChains(browser).key_down(Keys.SHIFT).click(card).key_up(Keys.SHIFT).perform()
    query = f"a red circle + #{first}"
    wait_for(browser, lambda d: d.find_element(By.ID, "query").get_attribute("value") == query,
             "shift-click never added the result to the query")
    wait_status(browser, f"results for “{query}”")
    want = searcher.search_terms(parse_query(query), k=12)
    wait_for(browser, lambda d: card_ids(d) == [h["id"] for h in want["results"]], "results never matched the API's")
    assert first not in card_ids(browser)  # the example itself is left out
    second = card_ids(browser)[0]
    card = browser.find_element(By.CSS_SELECTOR, f'#results .card[data-id="{second}"]')
    ActionChains(browser).key_down(Keys.ALT).click(card).key_up(Keys.ALT).perform()
    query = f"a red circle + #{first} - #{second}"
    wait_status(browser, f"results for “{query}”")
    want = searcher.search_terms(parse_query(query), k=12)
    wait_for(browser, lambda d: card_ids(d) == [h["id"] for h in want["results"]], "results never matched the API's")
    assert parse_qs(urlparse(browser.current_url).query)["q"] == [query]
