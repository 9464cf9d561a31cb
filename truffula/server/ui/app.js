// truffula playground: streams POST /generate_stream and shows every token's probability,
// rank, entropy and alternatives. Plain JS, no dependencies, no network beyond this server.
'use strict';

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const SIDES = ['a', 'b'];
  const SEED = '__seed__';
  const constraint = window.TruffulaConstraint;
  const runs = { a: null, b: null };
  let controller = null;
  let comparing = false;

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === 'class') el.className = value;
      else if (key === 'style') el.style.cssText = value;
      else el.setAttribute(key, value);
    }
    for (const child of children) el.append(child);
    return el;
  }

  /** Light background tint by probability: red (p=0) to green (p=1), lighter when likely,
   * always light enough for #111 text (contrast ratio above 9:1). */
  const shade = (p) => `hsl(${Math.round(120 * p)} 70% ${Math.round(80 + 12 * p)}%)`;
  const prob = (logprob) => (logprob === null || logprob === undefined ? null : Math.exp(logprob));
  const pct = (p) => (p === null ? '–' : `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 2 : 1)}%`);
  const fixed = (x, n = 4) => (x === null || x === undefined ? '–' : x.toFixed(n));
  const quoted = (text) => JSON.stringify(text); // shows spaces, \n and \t unambiguously

  // The API key (--api-key), asked for when the server answers 401: kept for this tab only
  // (sessionStorage) and sent as a Bearer token on every call.
  const KEY_ITEM = 'truffula-api-key';
  class KeyNeeded extends Error {}

  function authorized(headers = {}) {
    const key = sessionStorage.getItem(KEY_ITEM);
    return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
  }

  async function api(path, options = {}) {
    const resp = await fetch(path, { ...options, headers: authorized(options.headers) });
    if (resp.status === 401) throw new KeyNeeded(`${path}: HTTP 401`);
    return resp;
  }

  async function getJSON(path) {
    const resp = await api(path);
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  function askForKey(rejected) {
    $('#main').hidden = true;
    $('#model-info').textContent = 'API key required';
    $('#key-form').hidden = false;
    $('#key-error').hidden = !rejected;
    $('#key-error').textContent = rejected ? 'The server did not accept this key.' : '';
    $('#api-key').focus();
  }

  $('#key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $('#api-key').value.trim());
    $('#api-key').value = '';
    init();
  });

  function showError(prefix, body) {
    const kind = body && body.error_type ? ` (${body.error_type})` : '';
    const message = body && body.error ? body.error : String(body);
    $('#errors').append(h('p', { class: 'error' }, `${prefix}error${kind}: ${message}`));
  }

  // ------------------------------------------------------------------ set-up
  async function init() {
    document.querySelectorAll('.swatch[data-p]').forEach((el) => {
      el.style.background = shade(Number(el.dataset.p));
    });
    try {
      const info = await getJSON('/info');
      $('#model-info').textContent = `${info.model_id} · ${info.model_device_type} · ` +
        `k ≤ ${info.max_k_alternatives}`;
      $('#k').max = info.max_k_alternatives;
    } catch (err) {
      if (err instanceof KeyNeeded) {
        const rejected = sessionStorage.getItem(KEY_ITEM) !== null;
        sessionStorage.removeItem(KEY_ITEM);
        askForKey(rejected);
        return;
      }
      $('#model-info').textContent = 'server info unavailable';
    }
    $('#key-form').hidden = true;
    $('#main').hidden = false;
    try {
      fillAdapters((await getJSON('/v1/models')).data || []);
    } catch (err) {
      showError('', { error: `cannot list models: ${err.message}` });
    }
  }

  function fillAdapters(models) {
    for (const side of SIDES) {
      const select = $(`#adapter-${side}`);
      select.replaceChildren();
      models.forEach((m, i) => {
        const base = i === 0 && !m.parent;
        const label = base ? `base model (${m.id.split('/').pop()})` : `adapter: ${m.id}`;
        select.append(h('option', { value: base ? '' : m.id, title: m.id }, label));
      });
    }
    if (models.length > 1) $('#adapter-b').selectedIndex = 1;
  }

  function parameters(adapterId, constrained) {
    const num = (id) => (($(id).value.trim() === '') ? null : Number($(id).value));
    const p = {
      details: true,
      return_k_alternatives: num('#k'),
      logprobs_mode: $('#logprobs-mode').value,
      apply_chat_template: document.querySelector('input[name=mode]:checked').value === 'chat',
    };
    const temperature = num('#temperature');
    if (temperature !== null) p.temperature = temperature;
    if (temperature) p.do_sample = true;
    const topP = num('#top-p');
    if (topP !== null && topP !== 1) p.top_p = topP;
    const topK = num('#top-k');
    if (topK) p.top_k = topK;
    const maxNew = num('#max-new-tokens');
    if (maxNew !== null) p.max_new_tokens = maxNew;
    const seed = $('#seed').value.trim();
    // seeds go up to 2^64: digits are spliced into the JSON as is (a JS number would round them)
    if (seed) p.seed = /^\d+$/.test(seed) ? SEED : Number(seed);
    if (adapterId) p.adapter_id = adapterId;
    if (constrained) {
      // the model's own distribution, and at least its top token, to show what it preferred
      Object.assign(p, constrained, { logprobs_mode: 'raw' });
      if (!p.return_k_alternatives) p.return_k_alternatives = 1;
    }
    return p;
  }

  // ------------------------------------------------------------------ tokens
  function tokenSpan(side, i, tok) {
    const p = prob(tok.logprob);
    const el = h('span', { class: 'tok', tabindex: '0', 'data-side': side, 'data-i': i, 'data-id': tok.id });
    el.style.background = p === null ? '#e5e5e5' : shade(p);
    if (p !== null && p < 0.3) el.classList.add('low');
    if (tok.special) el.classList.add('special');
    if (tok.text === '') el.classList.add('empty');
    else if (/^[ \u00a0]+$/.test(tok.text)) el.classList.add('blank');
    // newlines and tabs keep their real characters (so the text stays exact) behind a glyph
    for (const part of tok.text.split(/(\n|\t)/)) {
      if (part === '\n') el.append(h('span', { class: 'ws nl' }, '\n'));
      else if (part === '\t') el.append(h('span', { class: 'ws tab' }, '\t'));
      else if (part) el.append(part);
    }
    el.title = `${pct(p)} · rank ${tok.rank ?? '–'}`;
    const over = runs[side].constrained && constraint.override(tok);
    if (over) {
      el.classList.add('constrained');
      el.title += ` · chosen by the constraint; the model preferred ${preferred(over)}`;
    }
    return el;
  }

  const preferred = (over) => (over.preferred
    ? `${quoted(over.preferred.text)} (${pct(prob(over.preferred.logprob))})`
    : 'another token (ask for k ≥ 1 alternatives to see which)');

  function addToken(run, tok) {
    if (runs[run.side] !== run) return; // a stream from an earlier click, still closing
    const side = run.side;
    run.tokens.push(tok);
    $(`#pane-${side} .tokens`).append(tokenSpan(side, run.tokens.length - 1, tok));
    $(`#pane-${side}`).dataset.count = run.tokens.length;
    if (comparing) markDivergence();
  }

  function finish(run, details) {
    if (runs[run.side] !== run) return;
    run.finished = true;
    const lps = run.tokens.map((t) => t.logprob).filter((x) => x !== null && x !== undefined);
    const mean = lps.length ? lps.reduce((a, b) => a + b, 0) / lps.length : null;
    const bits = [`${run.tokens.length} tokens`];
    if (details && details.finish_reason) bits.push(`finish: ${details.finish_reason}`);
    if (details && details.seed !== null && details.seed !== undefined) bits.push(`seed ${details.seed}`);
    if (run.constrained) {
      const forced = run.tokens.filter((t) => constraint.override(t)).length;
      bits.push(`${forced} chosen by the constraint against the model`);
    }
    if (mean !== null) bits.push(`mean logprob ${fixed(mean, 3)}`, `perplexity ${fixed(Math.exp(-mean), 3)}`);
    $(`#pane-${run.side} .stats`).textContent = bits.join(' · ');
  }

  // ------------------------------------------------------------------ inspector
  function inspect(el) {
    const side = el.dataset.side;
    const i = Number(el.dataset.i);
    const tok = runs[side] && runs[side].tokens[i];
    if (!tok) return;
    const p = prob(tok.logprob);
    const alts = tok.alternative_tokens || [];
    const box = $('#inspector');
    const facts = h('dl', { class: 'facts' },
      h('dt', {}, 'probability'), h('dd', { 'data-field': 'probability' }, pct(p)),
      h('dt', {}, 'logprob'), h('dd', { 'data-field': 'logprob' }, fixed(tok.logprob)),
      h('dt', {}, 'rank'), h('dd', { 'data-field': 'rank' }, String(tok.rank ?? '–')),
      h('dt', {}, 'entropy'), h('dd', { 'data-field': 'entropy' },
        tok.entropy === null || tok.entropy === undefined ? '–' : `${fixed(tok.entropy, 3)} nats`));
    const list = h('ol', { class: 'bars' });
    for (const alt of alts) {
      const ap = prob(alt.logprob);
      const row = h('li', { class: 'bar-row', 'data-id': alt.id, 'data-logprob': alt.logprob },
        h('code', { class: 'alt-text' }, quoted(alt.text)),
        h('span', { class: 'bar', 'aria-hidden': 'true' },
          h('span', { class: 'fill', style: `width:${Math.max(0.5, 100 * ap)}%` })),
        h('span', { class: 'alt-pct' }, pct(ap)),
        h('span', { class: 'alt-lp' }, fixed(alt.logprob, 3)));
      if (alt.id === tok.id) row.classList.add('chosen');
      list.append(row);
    }
    const parts = [
      h('h2', {}, 'Token details'),
      h('p', { class: 'tok-head' }, h('code', {}, quoted(tok.text)),
        ` ${runs[side].label} · token ${i + 1}${tok.special ? ' · special' : ''}`),
      facts,
    ];
    const over = runs[side].constrained && constraint.override(tok);
    if (over) {
      const attrs = { class: 'constrained-note', 'data-field': 'preferred' };
      if (over.preferred) attrs['data-id'] = over.preferred.id;
      parts.push(h('p', attrs, `Chosen by the constraint: the model preferred ${preferred(over)}; ` +
        `this token was its rank ${tok.rank}.`));
    }
    parts.push(h('h3', {}, runs[side].constrained
      ? `The model's top ${alts.length} (unconstrained)` : `Top ${alts.length} alternatives`));
    parts.push(alts.length ? list : h('p', { class: 'muted' }, 'none reported'));
    if (alts.length && !alts.some((a) => a.id === tok.id)) {
      const why = runs[side].constrained ? 'the constraint chose it' : 'it was sampled';
      parts.push(h('p', { class: 'muted' }, `The chosen token is not among them (${why}).`));
    }
    const other = comparing && runs[side === 'a' ? 'b' : 'a'];
    if (other && other.tokens[i]) {
      const o = other.tokens[i];
      const same = o.id === tok.id ? 'same token' : 'different token';
      parts.push(h('p', { class: 'other' }, `${other.label} here: `, h('code', {}, quoted(o.text)),
        ` ${pct(prob(o.logprob))} (${same})`));
    }
    box.replaceChildren(...parts);
    document.body.dataset.inspecting = '';
  }

  let hint = null;
  function closeInspector() {
    $('#inspector').replaceChildren(...hint.map((n) => n.cloneNode(true)));
    delete document.body.dataset.inspecting;
  }

  function onKey(ev) {
    const el = ev.target;
    if (!el.classList || !el.classList.contains('tok')) return;
    const pane = el.parentElement;
    const toks = pane.querySelectorAll('.tok');
    const i = Number(el.dataset.i);
    let next = null;
    if (ev.key === 'ArrowRight') next = toks[i + 1];
    else if (ev.key === 'ArrowLeft') next = toks[i - 1];
    else if (ev.key === 'Home') next = toks[0];
    else if (ev.key === 'End') next = toks[toks.length - 1];
    else if (ev.key === 'Escape') closeInspector();
    else if ((ev.key === 'ArrowUp' || ev.key === 'ArrowDown') && comparing) {
      const otherSide = el.dataset.side === 'a' ? 'b' : 'a';
      const others = $(`#pane-${otherSide} .tokens`).querySelectorAll('.tok');
      next = others[Math.min(i, others.length - 1)];
    }
    if (next) {
      ev.preventDefault();
      next.focus();
    }
  }

  // ------------------------------------------------------------------ compare
  function markDivergence() {
    const [a, b] = [runs.a, runs.b];
    const spans = (side) => $(`#pane-${side} .tokens`).querySelectorAll('.tok');
    const [sa, sb] = [spans('a'), spans('b')];
    document.querySelectorAll('.tok.diff, .tok.first-div').forEach((el) => el.classList.remove('diff', 'first-div'));
    const note = $('#divergence');
    if (a.failed || b.failed) { // nothing to compare against: the error says why
      note.hidden = true;
      return;
    }
    let first = null;
    let differ = 0;
    const shared = Math.min(a.tokens.length, b.tokens.length);
    for (let i = 0; i < shared; i++) {
      if (a.tokens[i].id === b.tokens[i].id) continue;
      differ += 1;
      sa[i].classList.add('diff');
      sb[i].classList.add('diff');
      if (first === null) first = i;
    }
    const done = a.complete && b.complete;
    if (first === null && done && a.tokens.length !== b.tokens.length) {
      first = shared; // one side stopped earlier: they part where it ended
      (sa[shared] || sb[shared]).classList.add('diff');
    }
    note.hidden = false;
    note.classList.toggle('differs', first !== null);
    if (first !== null) {
      if (sa[first]) sa[first].classList.add('first-div');
      if (sb[first]) sb[first].classList.add('first-div');
      const ta = a.tokens[first];
      const tb = b.tokens[first];
      const say = (t) => (t ? `${quoted(t.text)} (${pct(prob(t.logprob))})` : '(ended)');
      note.textContent = `First divergence at token ${first + 1}: A ${say(ta)} vs B ${say(tb)}. ` +
        `${differ} of ${shared} aligned positions differ (later ones follow different text).`;
    } else {
      const over = a.done && b.done ? '(stopped)' : 'so far…';
      note.textContent = done
        ? `Identical: A and B chose the same ${shared} tokens — no divergence.`
        : `No divergence in the first ${shared} tokens ${over}`;
    }
    note.dataset.first = first === null ? '' : String(first);
  }

  // ------------------------------------------------------------------ streaming
  async function stream(run, adapterId, signal) {
    const body = JSON.stringify({ inputs: $('#prompt').value, parameters: parameters(adapterId, run.constrained) })
      .replace(`"${SEED}"`, $('#seed').value.trim());
    const prefix = comparing ? `${run.label}: ` : '';
    let resp;
    try {
      resp = await api('/generate_stream', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body,
        signal,
      });
    } catch (err) {
      if (err instanceof KeyNeeded) {
        sessionStorage.removeItem(KEY_ITEM);
        askForKey(true);
      } else if (err.name !== 'AbortError') {
        fail(run, prefix, { error: err.message, error_type: 'network' });
      }
      return;
    }
    if (!resp.ok) {
      const text = await resp.text();
      let err;
      try { err = JSON.parse(text); } catch { err = { error: text || `HTTP ${resp.status}` }; }
      fail(run, prefix, err);
      return;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop();
        for (const block of blocks) handleEvent(run, block, prefix);
      }
      if (buffer.trim()) handleEvent(run, buffer, prefix);
    } catch (err) {
      if (err.name !== 'AbortError') fail(run, prefix, { error: err.message, error_type: 'network' });
    }
  }

  function fail(run, prefix, body) {
    run.failed = true;
    showError(prefix, body);
  }

  function handleEvent(run, block, prefix) {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
    if (!data || data === '[DONE]') return;
    const ev = JSON.parse(data);
    if (ev.error) {
      fail(run, prefix, ev);
      return;
    }
    const seed = /"seed":\s*(\d+)/.exec(data); // exact digits, not a rounded JS number
    if (seed && ev.details) ev.details.seed = seed[1];
    if (ev.token) addToken(run, ev.token);
    if (ev.generated_text !== null && ev.generated_text !== undefined) {
      run.complete = true; // the server's last event: the generation really ended here
      finish(run, ev.details);
    }
  }

  async function generate(ev) {
    ev.preventDefault();
    let constrained;
    try {
      constrained = constraint.fields();
    } catch (err) { // nothing starts; a generation already running goes on
      $('#errors').replaceChildren();
      showError('', { error: `constraint: ${err.message}`, error_type: 'validation' });
      return;
    }
    if (!Object.keys(constrained).length) constrained = null;
    if (controller) controller.abort();
    controller = new AbortController();
    comparing = $('#compare').checked;
    $('#errors').replaceChildren();
    $('#divergence').hidden = true;
    $('#pane-b').hidden = !comparing;
    const sides = comparing ? SIDES : ['a'];
    for (const side of sides) {
      const select = $(`#adapter-${side}`);
      const name = select.value || 'base model';
      runs[side] = {
        side, tokens: [], done: false, finished: false, constrained,
        label: comparing ? side.toUpperCase() : name,
      };
      const pane = $(`#pane-${side}`);
      pane.querySelector('.pane-title').textContent = comparing ? `${side.toUpperCase()} — ${name}` : name;
      pane.querySelector('.tokens').replaceChildren();
      pane.querySelector('.stats').textContent = 'generating…';
      pane.dataset.count = '0';
      pane.dataset.state = 'running';
    }
    document.body.dataset.state = 'running';
    $('#generate').disabled = true;
    $('#stop').disabled = false;
    const mine = controller;
    await Promise.all(sides.map(async (side) => {
      const run = runs[side];
      await stream(run, $(`#adapter-${side}`).value, mine.signal);
      if (runs[side] !== run) return;
      run.done = true;
      $(`#pane-${side}`).dataset.state = 'done';
      if (!run.finished) finish(run, { finish_reason: mine.signal.aborted ? 'stopped' : 'incomplete' });
      if (comparing) markDivergence();
    }));
    if (controller === mine) {
      controller = null;
      document.body.dataset.state = 'done';
      $('#generate').disabled = false;
      $('#stop').disabled = true;
    }
  }

  // ------------------------------------------------------------------ wiring
  $('#controls').addEventListener('submit', generate);
  $('#stop').addEventListener('click', () => controller && controller.abort());
  $('#compare').addEventListener('change', (ev) => { $('#compare-row').hidden = !ev.target.checked; });
  $('#prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) $('#controls').requestSubmit();
  });
  const panes = $('#panes');
  panes.addEventListener('keydown', onKey);
  panes.addEventListener('focusin', (ev) => {
    if (!ev.target.classList.contains('tok')) return;
    inspect(ev.target);
    ev.target.scrollIntoView({ block: 'nearest' }); // clear of the inspector on small screens
  });
  panes.addEventListener('mouseover', (ev) => {
    const el = ev.target.closest && ev.target.closest('.tok');
    if (el) inspect(el);
  });
  hint = [...$('#inspector').childNodes].map((n) => n.cloneNode(true));
  init();
})();
