"""The drawing page in a real headless Chromium, against a real `lenet serve` process.

Digits are drawn on the canvas with pointer events (mouse, pen and touch), and with the
keyboard; the page must show the right answer. Needs Debian's chromium and chromium-driver
(installed by .ci/run); skipped with a reason where they are missing.
"""

import math
import os
import shutil

import pytest
from serving import lenet_serve

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium-driver)",
)


# Strokes of prepared digits, in the page's 280x280 drawing units.
def _ellipse(cx, cy, rx, ry, n=28):
    return [
        (cx + rx * math.sin(2 * math.pi * k / n), cy - ry * math.cos(2 * math.pi * k / n))
        for k in range(n + 1)
    ]


DIGITS = {
    0: [_ellipse(140, 140, 55, 85)],
    1: [[(140, 50), (140, 140), (140, 230)]],
    4: [[(110, 50), (90, 165), (205, 165)], [(175, 70), (175, 235)]],
    7: [[(80, 60), (200, 60), (160, 140), (125, 230)]],
}


@pytest.fixture(scope="module")
def server():
    with lenet_serve() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900"):
        options.add_argument(flag)
    if os.environ.get("CI_CHROMIUM_FLAGS"):
        options.add_argument(os.environ["CI_CHROMIUM_FLAGS"])
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def draw(driver, strokes, kind=interaction.POINTER_MOUSE):
    """Trace strokes (in the drawing's units: 280x280, 840x280 for a line) on the canvas with
    pointer events of the given kind."""
    pad = driver.find_element(By.ID, "pad")
    width, height = driver.execute_script("return [units.width, units.height]")
    sx, sy = pad.size["width"] / width, pad.size["height"] / height
    pointer = PointerInput(kind, kind)
    actions = ActionBuilder(driver, mouse=pointer, duration=10)
    for stroke in strokes:
        # Offsets are from the element's centre, in CSS pixels.
        points = [((x - width / 2) * sx, (y - height / 2) * sy) for x, y in stroke]
        actions.pointer_action.move_to(pad, int(points[0][0]), int(points[0][1]))
        actions.pointer_action.pointer_down()
        for x, y in _densify(points):
            actions.pointer_action.move_to(pad, int(x), int(y))
        actions.pointer_action.pointer_up()
    actions.perform()


def _densify(points, step=8):
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        out += [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n) for k in range(1, n + 1)]
    return out


def shown(driver, element_id, text, timeout=15):
    """Wait until the element shows ``text``; return True, or fail with what it shows."""
    wait = WebDriverWait(driver, timeout)
    try:
        wait.until(lambda d: d.find_element(By.ID, element_id).text.strip() == text)
    except Exception:
        got = driver.find_element(By.ID, element_id).text
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"#{element_id} shows {got!r}, expected {text!r} (status: {status!r})")
    return True


def test_drawn_digits_are_read_with_mouse_pen_and_touch(server, browser):
    browser.get(server + "/")
    assert "lenet" in browser.title
    kinds = [interaction.POINTER_MOUSE, interaction.POINTER_PEN, interaction.POINTER_TOUCH]
    for k, (digit, strokes) in enumerate(DIGITS.items()):
        browser.find_element(By.ID, "clear").click()
        shown(browser, "digit", "–")
        draw(browser, strokes, kinds[k % len(kinds)])
        shown(browser, "digit", str(digit))
        # The bars, the confidence and the 28x28 input the model saw are shown too.
        best = browser.find_element(By.CSS_SELECTOR, "#bars li.best")
        assert best.text.split()[0] == str(digit)
        assert "sure" in browser.find_element(By.ID, "confidence").text
        seen = browser.find_element(By.ID, "model-input")
        assert seen.is_displayed() and seen.get_attribute("src").startswith("data:image/png")


def test_undo_clear_and_the_keyboard(server, browser):
    browser.get(server + "/")
    draw(browser, DIGITS[7])
    shown(browser, "digit", "7")
    draw(browser, [[(60, 240), (220, 240)]])  # a stray stroke, then undone
    browser.find_element(By.ID, "undo").click()
    shown(browser, "digit", "7")
    browser.find_element(By.ID, "clear").click()
    shown(browser, "digit", "–")
    # A 1 drawn with the keyboard alone: pen down, eighteen steps down, pen up.
    pad = browser.find_element(By.ID, "pad")
    pad.send_keys(Keys.ARROW_UP * 9, Keys.SPACE, Keys.ARROW_DOWN * 18, Keys.SPACE)
    shown(browser, "digit", "1")
    pad.send_keys(Keys.DELETE)
    shown(browser, "digit", "–")


def test_the_keyboard_pen_is_lifted_by_clear_undo_and_escape(server, browser):
    browser.get(server + "/")
    pad = browser.find_element(By.ID, "pad")
    # Cleared while the pen was down: the arrows draw nothing (they used to raise a TypeError
    # on every press), and Space then lowers the pen again, so a 1 can be drawn.
    pad.send_keys(Keys.SPACE, Keys.ARROW_DOWN * 5, Keys.DELETE, Keys.ARROW_DOWN * 3)
    assert browser.execute_script("return strokes.length") == 0
    pad.send_keys(Keys.ARROW_UP * 17, Keys.SPACE, Keys.ARROW_DOWN * 18, Keys.SPACE)
    shown(browser, "digit", "1")
    one = browser.execute_script("return JSON.stringify(strokes)")
    # A stroke begun to the right and undone while the pen was down: the arrows that follow
    # must not extend the 1 (they drew a line from its end to the pen).
    pad.send_keys(Keys.ARROW_RIGHT * 5, Keys.SPACE, Keys.ARROW_RIGHT * 3, Keys.BACKSPACE)
    pad.send_keys(Keys.ARROW_UP * 6)
    assert browser.execute_script("return JSON.stringify(strokes)") == one
    # Escape lifts the pen and keeps the drawing.
    pad.send_keys(Keys.SPACE, Keys.ARROW_UP, Keys.ESCAPE, Keys.ARROW_UP * 3)
    strokes = browser.execute_script("return strokes")
    assert len(strokes) == 2 and len(strokes[1]) == 2
    shown(browser, "digit", "1")


def test_several_digits_in_a_row(server, browser):
    browser.get(server + "/")
    browser.find_element(By.ID, "multi").click()
    assert browser.execute_script("return [units.width, units.height]") == [840, 280]
    # The wide drawing is 840x280: 7, 1 and 4 side by side.
    strokes = [
        [(x + 280 * slot, y) for x, y in stroke]
        for slot, digit in enumerate((7, 1, 4))
        for stroke in DIGITS[digit]
    ]
    draw(browser, strokes)
    shown(browser, "text", "714")


def test_a_phone_screen_gets_sharp_ink_and_the_service_the_usual_picture(server, browser):
    # A phone: 375x667 CSS pixels, 3 device pixels to each. The canvas had 280 pixels a side
    # shown over about 1,000 device pixels: blurred ink. Its pixels are now the screen's, and
    # what is sent is still the 280x280 drawing.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 667, "deviceScaleFactor": 3, "mobile": True},
    )
    try:
        browser.get(server + "/")
        pad = browser.find_element(By.ID, "pad")
        css = browser.execute_script("return arguments[0].getBoundingClientRect().width", pad)
        assert 300 <= css <= 360
        assert int(pad.get_attribute("width")) == round(css * 3)
        draw(browser, DIGITS[4], interaction.POINTER_TOUCH)
        shown(browser, "digit", "4")
        sent = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "picture().then((b) => createImageBitmap(b)).then((i) => done([i.width, i.height]));"
        )
        assert sent == [280, 280]
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_network_view_shows_feature_maps_of_the_drawing(server, browser):
    browser.get(server + "/")
    browser.find_element(By.ID, "explain").click()
    draw(browser, DIGITS[7])
    shown(browser, "digit", "7")
    WebDriverWait(browser, 15).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explanation .maps img")) > 20
    )
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#explanation h3")]
    assert titles[0].startswith("What the model saw") and any("Saliency" in t for t in titles)
    assert any("convolution" in t for t in titles) and any("pooling" in t for t in titles)


def test_the_api_docs_render_without_the_internet(server, browser):
    # Swagger UI's script and styles come from the package (fastapi-offline), not a CDN: this
    # machine reaches no CDN, so the page would stay blank if it tried.
    browser.get(server + "/docs")
    WebDriverWait(browser, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) >= 3
    )
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert any("/v1/predict" in p for p in paths), paths
