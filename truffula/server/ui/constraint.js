// truffula playground: structured output. The constraint picker's request fields (LoRAX
// `response_format` for a JSON schema, TGI `grammar` for a regex or a list of choices), and
// which tokens the constraint chose against the model: under a constraint the page asks for the
// model's own distribution (`logprobs_mode: "raw"`), where a chosen token of rank above 1 is one
// the model would not have picked.
'use strict';

window.TruffulaConstraint = (() => {
  const $ = (sel) => document.querySelector(sel);
  const HINTS = {
    json: 'A JSON schema, e.g. {"type": "object", "properties": {"name": {"type": "string"}}}. ' +
      'Empty: any JSON object. Sent as response_format.',
    regex: 'A regular expression the whole output must match, e.g. [0-9]{4}. Sent as grammar.',
    choice: 'One choice per line (spaces count); the output is exactly one of them. ' +
      'Sent as grammar: a regular expression of the escaped choices.',
  };
  // every character regex-syntax (llguidance's regex parser) treats as special
  const escapeRegex = (text) => text.replace(/[\\.+*?()|[\]{}^$#&\-~]/g, '\\$&');
  let freeMode = null; // the logprobs mode picked before a constraint was chosen

  function update() {
    const kind = $('#constraint').value;
    const mode = $('#logprobs-mode');
    $('#constraint-row').hidden = kind === '';
    $('#constraint-hint').textContent = HINTS[kind] || '';
    if (kind && !mode.disabled) {
      freeMode = mode.value;
      mode.value = 'raw';
      mode.disabled = true;
    } else if (!kind && mode.disabled) {
      mode.disabled = false;
      mode.value = freeMode || 'processed';
    }
    $('#raw-note').hidden = kind === '';
  }

  /** The request fields of the chosen constraint ({} for none); throws on an empty choice list
   * (everything else the server checks, and its 422 names the field). */
  function fields() {
    const kind = $('#constraint').value;
    const text = $('#constraint-value').value;
    if (kind === 'json') {
      return { response_format: text.trim() ? { type: 'json_object', schema: text } : { type: 'json_object' } };
    }
    if (kind === 'regex') return { grammar: { type: 'regex', value: text } };
    if (kind === 'choice') {
      const choices = text.split('\n').map((c) => c.replace(/\r$/, '')).filter((c) => c !== '');
      if (!choices.length) throw new Error('list at least one choice, one per line');
      return { grammar: { type: 'regex', value: `(?:${choices.map(escapeRegex).join('|')})` } };
    }
    return {};
  }

  /** For a token of a constrained run: null when the model would have chosen it too (raw rank
   * 1, or no rank reported), else the model's preferred token (its top alternative, or null
   * when no alternatives came back) as { preferred }. */
  function override(tok) {
    if (tok.rank === null || tok.rank === undefined || tok.rank <= 1) return null;
    const alts = tok.alternative_tokens || [];
    return { preferred: alts.length ? alts[0] : null };
  }

  $('#constraint').addEventListener('change', update);
  update();
  return { fields, override, escapeRegex };
})();
