"""End to end: the web playground at ``/`` in headless Debian chromium (Playwright) over a real
server. Tokens stream in, keyboard focus shows a token's alternatives, which match ``/generate``;
compare mode; server errors on the page; under a constraint, the tokens it chose against the
model are marked; screenshots in test-artifacts/.

Needs Debian's chromium (``make browser`` installs it; Playwright cannot download browsers here).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
FRENCH = ROOT / "examples" / "adapters" / "french"
PROMPT = "Once upon a time, in a land far away, there lived a"
K = 5
MAX_NEW_TOKENS = 40

PANEL_JS = """() => {
  const box = document.querySelector('#inspector');
  const field = (name) => box.querySelector(`[data-field=${name}]`)?.textContent;
  return {
    rank: field('rank'), entropy: field('entropy'), probability: field('probability'),
    bars: [...box.querySelectorAll('.bar-row')].map((r) => ({
      id: Number(r.dataset.id), logprob: Number(r.dataset.logprob),
      text: r.querySelector('.alt-text').textContent,
      pct: parseFloat(r.querySelector('.alt-pct').textContent),
      width: parseFloat(r.querySelector('.fill').style.width),
    })),
  };
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: run `make browser`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    """A fresh page on the playground; fails the test on any JavaScript error."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # (a 4xx answer is logged as "Failed to load resource"; the error test wants one)
    pg.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and errors.append(m.text)
        ),
    )
    open_playground(pg, server.url)
    yield pg
    pg.close()
    assert not errors, errors


def open_playground(pg: Any, url: str) -> None:
    pg.goto(url + "/")
    pg.wait_for_function("document.querySelectorAll('#adapter-a option').length > 0")


def settings(pg: Any, prompt: str, mode: str = "plain", **fields: str) -> None:
    pg.check(f"input[name=mode][value={mode}]")
    pg.fill("#prompt", prompt)
    values = {"temperature": "0", "max-new-tokens": str(MAX_NEW_TOKENS), "k": str(K), **fields}
    for name, value in values.items():
        pg.fill(f"#{name}", value)


def wait_done(pg: Any, timeout: float = 180) -> None:
    pg.wait_for_function("document.body.dataset.state === 'done'", timeout=timeout * 1000)


def dom_tokens(pg: Any, side: str = "a") -> list[dict[str, Any]]:
    return pg.evaluate(
        f"""[...document.querySelectorAll('#pane-{side} .tok')].map((el) => ({{
            id: Number(el.dataset.id), text: el.textContent, i: Number(el.dataset.i) }}))"""
    )


def greedy_reference(server: Any, prompt: str) -> dict[str, Any]:
    body = {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
            "details": True,
            "return_k_alternatives": K,
        },
    }
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_stream_in_and_show_their_alternatives(page: Any, server: Any) -> None:
    settings(page, PROMPT)
    page.click("#generate")
    counts = []
    deadline = time.time() + 180
    while page.evaluate("document.body.dataset.state") != "done":
        assert time.time() < deadline, "the stream did not finish"
        counts.append(page.locator("#pane-a .tok").count())
        time.sleep(0.01)
    tokens = dom_tokens(page)
    final = len(tokens)
    assert final == MAX_NEW_TOKENS
    # the page grew while the stream was open: several partial counts were seen
    partial = sorted({c for c in counts if 0 < c < final})
    assert len(partial) >= 2, counts
    assert counts == sorted(counts)

    ref = greedy_reference(server, PROMPT)
    ref_tokens = ref["details"]["tokens"]
    assert [t["id"] for t in tokens] == [t["id"] for t in ref_tokens]
    assert "".join(t["text"] for t in tokens) == ref["generated_text"]
    stats = page.text_content("#pane-a .stats")
    assert f"{MAX_NEW_TOKENS} tokens" in stats and "finish: length" in stats
    assert page.locator(".tok.constrained, .constrained-note").count() == 0  # no constraint

    # keyboard: Tab from the Generate button lands on the first token; arrows move along
    page.focus("#generate")
    page.keyboard.press("Tab")
    for i, want in enumerate(ref_tokens):
        if i:
            page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.dataset.i") == str(i)
        panel = page.evaluate(PANEL_JS)
        bars = panel["bars"]
        assert len(bars) == K
        assert [b["id"] for b in bars] == [a["id"] for a in want["alternative_tokens"]]
        quoted = [json.dumps(a["text"], ensure_ascii=False) for a in want["alternative_tokens"]]
        assert [b["text"] for b in bars] == quoted
        for bar, alt in zip(bars, want["alternative_tokens"], strict=True):
            assert abs(bar["logprob"] - alt["logprob"]) < 1e-4
            assert abs(bar["width"] - max(0.5, 100 * math.exp(alt["logprob"]))) < 0.01
        pcts = [b["pct"] for b in bars]
        assert pcts == sorted(pcts, reverse=True), pcts
        assert panel["rank"] == str(want["rank"])
        assert panel["entropy"] == f"{want['entropy']:.3f} nats"
    page.keyboard.press("Home")
    assert page.evaluate("document.activeElement.dataset.i") == "0"
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.i") == str(MAX_NEW_TOKENS - 1)

    # hovering shows a token too
    page.locator("#pane-a .tok").nth(3).hover()
    assert page.evaluate(PANEL_JS)["rank"] == str(ref_tokens[3]["rank"])
    assert "token 4" in page.text_content("#inspector")


def test_whitespace_is_kept_and_newlines_are_visible(page: Any) -> None:
    settings(page, "def fibonacci(n):", **{"max-new-tokens": "24"})
    page.click("#generate")
    wait_done(page)
    text = "".join(t["text"] for t in dom_tokens(page))
    assert "\n" in text and "return" in text
    glyphs = page.evaluate(
        """[...document.querySelectorAll('#pane-a .ws.nl')].map(
            (el) => getComputedStyle(el, '::before').content)"""
    )
    assert glyphs and set(glyphs) == {'"↵"'}
    assert page.text_content("#pane-a .tokens") == text


def test_server_errors_are_shown(page: Any) -> None:
    settings(page, PROMPT, k="50")
    page.click("#generate")
    wait_done(page)
    alert = page.text_content("#errors")
    assert "validation" in alert and "return_k_alternatives" in alert and "20" in alert
    assert page.locator("#pane-a .tok").count() == 0


def test_stop_aborts_the_stream(page: Any) -> None:
    settings(page, PROMPT, **{"max-new-tokens": "400"})
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#pane-a .tok').length >= 3")
    page.click("#stop")
    wait_done(page, timeout=30)
    assert page.locator("#pane-a .tok").count() < 400
    assert "finish: stopped" in page.text_content("#pane-a .stats")
    assert page.text_content("#errors") == ""
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")


def test_compare_base_with_base_is_identical(page: Any) -> None:
    settings(page, "Write a haiku about the sea.", mode="chat")
    page.check("#compare")
    page.select_option("#adapter-a", "")
    page.select_option("#adapter-b", "")
    page.click("#generate")
    wait_done(page)
    a, b = dom_tokens(page, "a"), dom_tokens(page, "b")
    assert a and [t["id"] for t in a] == [t["id"] for t in b]
    note = page.locator("#divergence")
    assert note.is_visible() and "Identical" in note.text_content()
    assert page.get_attribute("#divergence", "data-first") == ""
    assert page.locator(".tok.diff, .tok.first-div").count() == 0
    # up/down move between the two sides at the same position
    page.locator("#pane-b .tok").nth(2).focus()
    page.keyboard.press("ArrowUp")
    assert page.evaluate(
        "[document.activeElement.dataset.side, document.activeElement.dataset.i]"
    ) == [
        "a",
        "2",
    ]
    assert "same token" in page.text_content("#inspector")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def random_adapter(model_dir: Any, folder: Path) -> None:
    """A PEFT LoRA with large random weights: it changes the model's answers at once."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_server(model_dir: Any, tmp_path_factory: Any) -> Iterator[tuple[Any, str]]:
    """A server with the example French adapter preloaded (or, while examples/adapters/french
    is not there, a random adapter), when this tree serves adapters."""
    from serverproc import ServerProcess

    if (FRENCH / "adapter_config.json").exists():
        args = ["--preload-adapter", str(FRENCH.relative_to(ROOT))]
    else:
        root = tmp_path_factory.mktemp("playground-adapters")
        random_adapter(model_dir, root / "noisy")
        args = ["--adapter-root", str(root), "--preload-adapter", "noisy"]
    try:
        proc = ServerProcess(*args, "--max-k-alternatives", "20")
    except RuntimeError as exc:
        pytest.skip(f"the server cannot preload the adapter: {exc}")
    models = httpx.get(proc.url + "/v1/models", timeout=30).json()["data"]
    adapters = [m["id"] for m in models[1:]]
    if not adapters:
        proc.stop()
        pytest.skip("the server lists no adapter")
    yield proc, adapters[0]
    proc.stop()


def test_compare_adapter_with_base_marks_the_divergence(
    browser: Any, adapter_server: tuple[Any, str]
) -> None:
    proc, adapter = adapter_server
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        open_playground(pg, proc.url)
        options = pg.eval_on_selector_all("#adapter-b option", "els => els.map(e => e.value)")
        assert options[0] == "" and adapter in options
        settings(pg, "Describe a rabbit in one sentence.", mode="chat")
        pg.check("#compare")
        pg.select_option("#adapter-a", "")
        pg.select_option("#adapter-b", adapter)
        pg.click("#generate")
        wait_done(pg)
        first = pg.get_attribute("#divergence", "data-first")
        assert first not in (None, ""), pg.text_content("#divergence")
        a, b = dom_tokens(pg, "a"), dom_tokens(pg, "b")
        i = int(first)
        assert [t["id"] for t in a[:i]] == [t["id"] for t in b[:i]]
        assert pg.locator(".tok.first-div").count() >= 1
        assert "First divergence" in pg.text_content("#divergence")
        ARTIFACTS.mkdir(exist_ok=True)
        pg.locator(".tok.first-div").first.focus()
        pg.screenshot(path=str(ARTIFACTS / "playground-adapter.png"), full_page=True)
    finally:
        pg.close()


def test_without_a_key_the_page_never_asks_for_one(page: Any) -> None:
    assert page.is_hidden("#key-form") and page.is_visible("#main")
    assert page.evaluate("sessionStorage.getItem('truffula-api-key')") is None


def test_api_key_is_asked_kept_for_the_tab_and_sent(browser: Any, extras_server: Any) -> None:
    """With --api-key the page loads but shows nothing of the server until the key is
    accepted; the key is then sent as a Bearer token on every call (generation too)."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    calls: list[tuple[str, str | None]] = []
    pg.on("request", lambda r: calls.append((r.url, r.headers.get("authorization"))))
    try:
        pg.goto(extras_server.url + "/")
        pg.wait_for_selector("#key-form", state="visible")
        assert pg.is_hidden("#main")
        assert pg.text_content("#model-info") == "API key required"
        assert pg.locator("#adapter-a option").count() == 0
        pg.fill("#api-key", "wrong-key")
        pg.click("#key-submit")
        pg.wait_for_selector("#key-error", state="visible")
        assert pg.is_hidden("#main") and "not accept" in pg.text_content("#key-error")
        pg.fill("#api-key", extras_server.key)
        pg.click("#key-submit")
        pg.wait_for_function("document.querySelectorAll('#adapter-a option').length > 0")
        assert pg.is_visible("#main") and pg.is_hidden("#key-form")
        assert "SmolLM2" in pg.text_content("#model-info")
        stored = pg.evaluate("sessionStorage.getItem('truffula-api-key')")
        assert stored == extras_server.key
        assert pg.evaluate("localStorage.length") == 0
        settings(pg, "The three primary colors are", **{"max-new-tokens": "4"})
        pg.click("#generate")
        wait_done(pg)
        assert pg.locator("#pane-a .tok").count() == 4
        api = [(u, a) for u, a in calls if "/ui/" not in u and not u.endswith("/")]
        assert any(u.endswith("/generate_stream") for u, _ in api)
        good = f"Bearer {extras_server.key}"
        after = api[[a for _, a in api].index(good) :]
        assert all(a == good for _, a in after), after
    finally:
        pg.close()


def regex_escape(text: str) -> str:
    """Escape every character llguidance's regex parser treats as special."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


def constrained_reference(server: Any, prompt: str, grammar: dict[str, str]) -> dict[str, Any]:
    """The same greedy request under the constraint, straight from ``/generate``, with the
    model's own (raw) distribution."""
    body = {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
            "details": True,
            "return_k_alternatives": K,
            "logprobs_mode": "raw",
            "grammar": grammar,
        },
    }
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sent_bodies(pg: Any) -> list[dict[str, Any]]:
    """The bodies of the page's ``/generate_stream`` calls, collected from now on."""
    bodies: list[dict[str, Any]] = []
    pg.on(
        "request",
        lambda r: r.url.endswith("/generate_stream") and bodies.append(json.loads(r.post_data)),
    )
    return bodies


def page_pct(logprob: float) -> str:
    """A probability as the page writes it."""
    p = math.exp(logprob)
    return f"{100 * p:.{2 if p >= 0.995 or p < 0.001 else 1}f}%"


def check_constrained_marks(pg: Any, ref: dict[str, Any]) -> list[bool]:
    """The page's tokens are the reference's, and exactly those of raw rank above 1 carry the
    mark, whose tooltip and panel name the model's preferred token and its probability."""
    ref_tokens = ref["details"]["tokens"]
    tokens = dom_tokens(pg)
    assert [t["id"] for t in tokens] == [t["id"] for t in ref_tokens]
    assert [t["text"] for t in tokens] == [t["text"] for t in ref_tokens]
    marks = pg.evaluate(
        "[...document.querySelectorAll('#pane-a .tok')].map((el) => el.classList.contains('constrained'))"
    )
    overridden = [t["rank"] > 1 for t in ref_tokens]
    assert marks == overridden, list(zip(marks, [t["rank"] for t in ref_tokens], strict=True))
    for i, want in enumerate(ref_tokens):
        tok = pg.locator("#pane-a .tok").nth(i)
        tok.focus()
        panel = pg.evaluate(PANEL_JS)
        assert panel["rank"] == str(want["rank"])
        assert [b["id"] for b in panel["bars"]] == [a["id"] for a in want["alternative_tokens"]]
        note = pg.locator("#inspector [data-field=preferred]")
        if not overridden[i]:
            assert note.count() == 0
            assert "constraint" not in (tok.get_attribute("title") or "")
            continue
        top = want["alternative_tokens"][0]
        assert top["id"] != want["id"]
        said = f"{json.dumps(top['text'], ensure_ascii=False)} ({page_pct(top['logprob'])})"
        text = note.text_content()
        assert "Chosen by the constraint" in text and said in text, (text, said)
        assert f"rank {want['rank']}" in text
        assert note.get_attribute("data-id") == str(top["id"])
        assert said in tok.get_attribute("title")
    forced = sum(overridden)
    assert f"{forced} chosen by the constraint" in pg.text_content("#pane-a .stats")
    return marks


def test_constraint_marks_the_tokens_it_chose_against_the_model(page: Any, server: Any) -> None:
    """A regex of digits after a prompt that invites prose: the model never wanted the first
    digit (raw rank above 1), may agree with the next ones, and never wanted EOS."""
    bodies = sent_bodies(page)
    settings(page, PROMPT)
    assert page.is_hidden("#constraint-row") and page.is_enabled("#logprobs-mode")
    page.select_option("#constraint", "regex")
    # under a constraint the page asks for the model's own distribution
    assert page.is_visible("#constraint-row") and page.is_visible("#raw-note")
    assert page.is_disabled("#logprobs-mode")
    assert page.input_value("#logprobs-mode") == "raw"
    page.fill("#constraint-value", "[0-9]{4}")
    page.click("#generate")
    wait_done(page)
    assert page.text_content("#errors") == ""
    grammar = {"type": "regex", "value": "[0-9]{4}"}
    sent = bodies[-1]["parameters"]
    assert sent["grammar"] == grammar and sent["logprobs_mode"] == "raw"
    assert "response_format" not in sent

    ref = constrained_reference(server, PROMPT, grammar)
    assert ref["generated_text"].isdigit() and len(ref["generated_text"]) == 4
    marks = check_constrained_marks(page, ref)
    assert any(marks) and not all(marks), marks  # both kinds are there to tell apart
    legend = page.locator(".legend .constrained-demo")
    assert legend.is_visible() and "constraint" in legend.text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#pane-a .tok.constrained").first.focus()
    page.screenshot(path=str(ARTIFACTS / "playground-constrained.png"), full_page=True)

    # back to no constraint: the mode picked before comes back, and nothing is marked
    page.select_option("#constraint", "")
    assert page.is_enabled("#logprobs-mode") and page.input_value("#logprobs-mode") == "processed"
    page.fill("#max-new-tokens", "6")
    page.click("#generate")
    wait_done(page)
    sent = bodies[-1]["parameters"]
    assert "grammar" not in sent and sent["logprobs_mode"] == "processed"
    assert page.locator("#pane-a .tok").count() == 6
    assert page.locator(".tok.constrained").count() == 0


def test_choice_constraint_is_sent_as_an_escaped_regex(page: Any, server: Any) -> None:
    choices = ["purple (elephant)?", "banana split + 2"]
    bodies = sent_bodies(page)
    settings(page, PROMPT)
    page.select_option("#constraint", "choice")
    page.fill("#constraint-value", "\n".join(["", *choices, ""]))
    page.click("#generate")
    wait_done(page)
    assert page.text_content("#errors") == ""
    grammar = {"type": "regex", "value": "(?:" + "|".join(map(regex_escape, choices)) + ")"}
    assert bodies[-1]["parameters"]["grammar"] == grammar
    ref = constrained_reference(server, PROMPT, grammar)
    assert ref["generated_text"] in choices
    marks = check_constrained_marks(page, ref)
    assert marks[0], marks  # nothing in the story asked for either choice

    # an empty list is refused on the page, before anything is sent
    sent = len(bodies)
    page.fill("#constraint-value", "\n")
    page.click("#generate")
    assert "at least one choice" in page.text_content("#errors")
    assert len(bodies) == sent and page.locator("#pane-a .tok").count() == len(marks)
