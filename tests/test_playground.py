"""The playground page in a real headless browser (Debian's chromium driven by Playwright):
type a prompt, watch tokens stream in, click one, and check the attention heatmap is drawn."""

from __future__ import annotations

import os

import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.serve import create_app
from lmforge.tokenizers import CharTokenizer

from test_serve import live_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-extensions", "--disable-sync", "--no-first-run",
        "--mute-audio", "--disable-component-update", "--disable-default-apps"]

COUNT_INK = """() => {
  const c = document.getElementById('heatmap');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 245 || d[i + 1] < 245 || d[i + 2] < 245) n++;
  return n;
}"""


def test_playground_streams_tokens_and_draws_attention(tmp_path, shakespeare_text):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    tok = CharTokenizer.train(shakespeare_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    app = create_app(model, tok, model_name="tiny")
    with live_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')", timeout=15_000)
            page.fill("#prompt", "ROMEO:")
            page.fill("#max_tokens", "24")
            page.fill("#seed", "3")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('.tok').length === 24", timeout=30_000)
            page.wait_for_function("!document.getElementById('go').disabled", timeout=30_000)
            probs = [float(p) for p in page.locator(".tok .p").all_inner_texts()]
            assert len(probs) == 24 and all(0.0 <= p <= 1.0 for p in probs)

            page.locator(".tok").nth(5).click()  # chosen after the 6 prompt tokens and 5 generated ones
            page.wait_for_function("document.getElementById('heatmap').dataset.cells === '11'", timeout=15_000)
            assert page.evaluate(COUNT_INK) > 100
            assert "layer 1" in page.inner_text("#heat-info")  # the top layer by default
            assert page.locator("#strip .ctx").count() == 11

            page.select_option("#head", "1")
            page.wait_for_function("document.getElementById('heat-info').textContent.includes('head 1')",
                                   timeout=15_000)
            page.select_option("#layer", "0")
            page.wait_for_function("document.getElementById('heat-info').textContent.includes('layer 0')",
                                   timeout=15_000)
            assert page.evaluate(COUNT_INK) > 100
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
