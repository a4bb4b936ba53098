"""The chat page at ``/``, driven in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed
by ``.ci/run``): upload a scene, ask, see the answer stream in, ask again in the same conversation, pick an example.

``LYNX_ZOO_SCREENSHOT=docs/serving-chat.png`` also saves the final page there (docs/serving.md says how the
committed one was taken).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from lynx_zoo.data.processor import Sample

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
)

pytestmark = pytest.mark.slow


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: .ci/run installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def _answers(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".message.assistant[data-state=done] .text")]


def _ask(driver, question: str, count: int) -> str:
    """Type a question, send it, wait until the ``count``-th answer is complete; return its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(lambda d: len(_answers(d)) >= count or d.find_elements(By.CSS_SELECTOR, ".error"))
    errors = driver.find_elements(By.CSS_SELECTOR, ".message.error")
    assert not errors, errors[0].text
    return _answers(driver)[count - 1]


def _reference(model, image: Path, question: str, history: list[tuple[str, str]]) -> str:
    """What the model answers about ``image`` after ``history`` (``generate`` when there is none)."""
    if not history:
        return model.generate(images=[image], prompts=[question])[0]
    prompts = model.processor.prompts([Sample(question, history=history)])
    pixels = model.processor.image_transform(Image.open(image).convert("RGB"))[None]
    return model.decode(
        model.generate_ids(prompts["input_ids"], prompts["attention_mask"], pixels, **model.eval_generation)
    )[0]


def test_chat_page_uploads_a_scene_and_streams_the_answers(browser, tiny_server, served_model, media_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(tiny_server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert "lynx-serve-tiny" in driver.find_element(By.ID, "model-name").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#examples button")) == 6

    # upload a scene through the file input, as a person would
    scene = media_root / "scene1.png"
    driver.find_element(By.ID, "file-input").send_keys(str(scene))
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
    first = "how many shapes are there?"
    answer = _ask(driver, first, 1)
    assert answer and answer == _reference(served_model, scene, first, [])
    # a second question in the same conversation: the first turn is its history
    second = "what color is the circle?"
    assert _ask(driver, second, 2) == _reference(served_model, scene, second, [(first, answer)])
    user_turns = driver.find_elements(By.CSS_SELECTOR, ".message.user")
    assert [t.text for t in user_turns] == [first, second] and user_turns[0].find_elements(By.CSS_SELECTOR, "img")

    # an example scene starts a new conversation; its suggested questions fill the box
    driver.find_element(By.CSS_SELECTOR, "#examples button[data-name='scene-2']").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#suggestions button"))
    assert not _answers(driver)
    chip = driver.find_elements(By.CSS_SELECTOR, "#suggestions button")[1]
    question = chip.text
    chip.click()
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(lambda d: len(_answers(d)) == 1)
    example = tmp_path / "scene-2.png"
    example.write_bytes(_example_png(tiny_server.url, "scene-2"))
    assert _answers(driver)[0] == _reference(served_model, example, question, [])

    target = os.environ.get("LYNX_ZOO_SCREENSHOT")
    if target:
        driver.save_screenshot(target)


def _example_png(url: str, name: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{url}/examples/{name}.png", timeout=10) as response:
        return response.read()
