"""The chat page at ``/``, driven in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed
by ``.ci/run``): upload a video and ask about it, pick an example scene and ask a suggested question, upload a
scene and ask two questions in one conversation; every answer must be the model's own.

By default the page serves the tests' tiny variant; ``LYNX_ZOO_SERVE_VARIANT=lynx-demo`` serves another one, and
``LYNX_ZOO_SCREENSHOT=docs/serving-chat.png`` saves the final page (how docs/serving.md's screenshot is taken).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
from media import write_clip
from PIL import Image

from lynx_zoo.data.processor import Sample
from lynx_zoo.data.shapes import render_scene

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


@pytest.fixture(scope="module")
def page_server(request, start_server):
    """(server, model): the served variant and the same variant loaded here, for the reference answers."""
    variant = os.environ.get("LYNX_ZOO_SERVE_VARIANT")
    if not variant:
        return request.getfixturevalue("tiny_server"), request.getfixturevalue("served_model")
    from lynx_zoo import load_model

    return start_server("--variant", variant), load_model(variant)


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


def test_chat_page_uploads_a_scene_and_streams_the_answers(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, model = page_server
    driver = browser
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert driver.find_element(By.ID, "model-name").text.startswith(model_id(server))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#examples button")) == 6

    # a video, when the variant reads them: the page sends it as a video_url data URL
    if model.vision_config.num_frames:
        clip = write_clip(tmp_path / "clip.mp4", size=model.vision_config.image_size)
        driver.find_element(By.ID, "file-input").send_keys(str(clip))
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview video"))
        question = "how many shapes are there?"
        assert _ask(driver, question, 1) == model.generate(videos=[clip], prompts=[question])[0]

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
    example.write_bytes(_example_png(server.url, "scene-2"))
    assert _answers(driver)[0] == _reference(model, example, question, [])

    # upload a scene through the file input, as a person would, and talk about it
    scene = tmp_path / "scene.png"
    render_scene(random.Random(1), model.vision_config.image_size)[0].save(scene)
    driver.find_element(By.ID, "file-input").send_keys(str(scene))
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img") and not _answers(d))
    first = "how many shapes are there?"
    answer = _ask(driver, first, 1)
    assert answer and answer == _reference(model, scene, first, [])
    # a second question in the same conversation: the first turn is its history
    second = "what color is the circle?"
    assert _ask(driver, second, 2) == _reference(model, scene, second, [(first, answer)])
    user_turns = driver.find_elements(By.CSS_SELECTOR, ".message.user")
    assert [t.text for t in user_turns] == [first, second] and user_turns[0].find_elements(By.CSS_SELECTOR, "img")

    target = os.environ.get("LYNX_ZOO_SCREENSHOT")
    if target:
        driver.save_screenshot(target)


def model_id(server) -> str:
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def _example_png(url: str, name: str) -> bytes:
    with urllib.request.urlopen(f"{url}/examples/{name}.png", timeout=10) as response:
        return response.read()


def test_chat_page_asks_for_the_api_key_once(browser, start_server, served_variant, served_model):
    """A server started with ``--api-key``: the page asks for the key (a wrong one is asked for again), keeps it,
    and answers as ``generate`` does; after a reload it does not ask again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server("--variant", str(served_variant), "--api-key", "page-key")
    driver = browser
    driver.get(server.url + "/")

    def enter(key: str) -> None:
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        box = driver.find_element(By.ID, "api-key")
        box.send_keys(key)
        driver.find_element(By.ID, "key-submit").click()

    enter("wrong-key")
    WebDriverWait(driver, 30).until(
        lambda d: (
            "Incorrect API key" in d.find_element(By.ID, "key-message").text
            and d.find_element(By.ID, "key-form").is_displayed()
        )
    )
    enter("page-key")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    question = "how many shapes are there?"
    assert _ask(driver, question, 1) == served_model.generate(prompts=[question])[0]
    driver.refresh()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert not driver.find_element(By.ID, "key-form").is_displayed()
