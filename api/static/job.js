// The job page: the layer x token grid of one prompt (tokens across, layers down), colored by mean relevancy;
// a lenses job as a layer x token grid of one lens's top-1 token; a job of another kind (vectors) as a table of its
// result rows, in the columns its kind gives.
"use strict";
(() => {
  const { api, download, saveBlob, color, textColor, el } = Selfie;
  const jobId = location.pathname.split("/").filter(Boolean).pop();
  const $ = id => document.getElementById(id);
  const state = { job: null, cells: new Map(), flags: new Map(), prompt: 0, pinned: null };

  async function loadPrompt(index) {
    state.prompt = index;
    state.cells = new Map();
    let cursor = null;
    do {  // page through the interpretations endpoint, exactly as a client does
      const q = new URLSearchParams({ prompt: index, limit: 1000, sort: "position" });
      if (cursor) q.set("cursor", cursor);
      const page = await api(`/v1/jobs/${jobId}/interpretations?` + q);
      for (const r of page.items) state.cells.set(r.layer + ":" + r.token, r);
      cursor = page.next_cursor;
    } while (cursor);
    state.flags = new Map();
    try {  // audit findings on this prompt, when the job belongs to an audit run
      const f = await api(`/v1/jobs/${jobId}/findings?prompt=${index}`);
      for (const x of f.items) {
        const k = x.layer + ":" + x.token;
        if (!state.flags.has(k)) state.flags.set(k, []);
        state.flags.get(k).push(x);
      }
    } catch (e) { /* no findings to show */ }
    const p = state.job.prompts.find(p => p.index === index);
    $("prompt-text").textContent = p ? p.text : "";
    render();
  }

  function render() {
    const p = state.job.prompts.find(p => p.index === state.prompt) || { tokens: [] };
    const rows = [...state.cells.values()];
    const layers = [...new Set(rows.map(r => r.layer))].sort((a, b) => a - b);
    const tokens = [...new Set(rows.map(r => r.token))].sort((a, b) => a - b);
    const lmin = $("layer-min").value === "" ? -Infinity : +$("layer-min").value;
    const lmax = $("layer-max").value === "" ? Infinity : +$("layer-max").value;
    const minRel = +$("min-rel").value;
    const needle = $("search").value.trim().toLowerCase();
    const maxRel = Math.max(1e-9, ...rows.map(r => r.mean_relevancy));
    const scale = $("scale").value === "abs" ? 1 : maxRel;
    $("legend-range").textContent = "0 .. " + scale.toFixed(3);
    $("legend-bar").style.background = `linear-gradient(to right, ${color(0)}, ${color(0.5)}, ${color(1)})`;

    const table = $("grid");
    table.replaceChildren();
    const head = el("tr", {}, el("th", { class: "layer", text: "layer \\ token" }));
    for (const t of tokens) head.append(el("th", { title: `token ${t}`, "data-token": t, text: JSON.stringify(p.tokens[t] ?? String(t)).slice(1, -1) || " " }));
    table.append(el("thead", {}, head));
    const body = el("tbody");
    let shown = 0, notGrounded = 0;
    for (const l of layers) {
      if (l < lmin || l > lmax) continue;
      const tr = el("tr", {}, el("th", { class: "layer", text: String(l) }));
      for (const t of tokens) {
        const r = state.cells.get(l + ":" + t);
        if (!r) { tr.append(el("td", { class: "cell empty" })); continue; }
        const v = r.mean_relevancy / scale;
        const ungrounded = r.grounded === false;  // null: stored before rows were judged
        const td = el("td", { class: "cell", "data-layer": l, "data-token": t, "data-relevancy": r.mean_relevancy.toFixed(4),
                              title: `layer ${l}, token ${t} ${JSON.stringify(r.source_token)}: ${r.text}`
                                     + (ungrounded ? `\n(not grounded: ${REASONS[r.ungrounded_reason] || r.ungrounded_reason})` : "") });
        if (ungrounded) { td.classList.add("ungrounded"); td.dataset.reason = r.ungrounded_reason; notGrounded++; }
        td.textContent = r.text.trim().slice(0, 40) || "(blank)";  // e.g. an end-of-sequence right away
        td.style.background = color(v);
        td.style.color = textColor(v);
        const flags = state.flags.get(l + ":" + t);
        if (flags) { td.classList.add("flag"); td.dataset.flags = flags.map(f => f.detector + ": " + f.label).join(", "); }
        const hidden = r.mean_relevancy < minRel || (needle && !r.text.toLowerCase().includes(needle))
                       || ($("flagged-only").checked && !flags) || ($("grounded-only").checked && ungrounded);
        if (hidden) td.classList.add("dim");
        if (needle && !hidden) td.classList.add("hit");
        if (state.pinned === l + ":" + t) td.classList.add("selected");
        td.onmouseenter = () => { if (!state.pinned) showDetail(r, flags); };
        td.onclick = () => {
          state.pinned = state.pinned === l + ":" + t ? null : l + ":" + t;
          table.querySelectorAll("td.selected").forEach(c => c.classList.remove("selected"));
          if (state.pinned) td.classList.add("selected");
          showDetail(r, flags);
        };
        tr.append(td);
        shown++;
      }
      body.append(tr);
    }
    table.append(body);
    $("grid-info").textContent = `${shown} interpretations, ${layers.length} layers x ${tokens.length} tokens`
      + (notGrounded ? `, ${notGrounded} not grounded (faded)` : "")
      + (state.flags.size ? `, ${state.flags.size} flagged by the audit` : "");
  }

  const REASONS = { baseline: "the same as the baseline", repetition: "degenerate repetition",
                    empty: "no words", low_relevancy: "mean relevancy under the job's threshold" };

  function showBaseline(job) {
    const b = job.baseline;
    $("baseline-text").textContent = b ? (b.text.trim() || "(blank)") : "not computed yet";
    $("baseline-text").classList.toggle("set", !!b);
    $("baseline-text").classList.toggle("muted", !b);
  }

  // Generated tokens as text, per row (the API decodes ids with the model card's tokenizer); fetched once per row.
  const tokenTexts = new Map();
  function generatedTokens(r) {
    const key = r.token_ids.join(",");
    if (!tokenTexts.has(key)) {
      tokenTexts.set(key, r.token_ids.length
        ? api(`/v1/models/${encodeURIComponent(state.job.model)}/detokenize?ids=${key}`).then(t => t.tokens)
        : Promise.resolve([]));
    }
    return tokenTexts.get(key);
  }

  // Each generated token with its relevancy under it, shaded on the grid's scale against the row's largest value,
  // so the words the injected state caused stand out.
  function tokenStrip(r, texts) {
    const top = Math.max(1e-9, ...r.relevancy);
    return el("div", { class: "tokens", id: "detail-tokens" }, ...r.relevancy.map((rel, i) => {
      const v = rel / top;
      const chip = el("span", { class: "tok", "data-relevancy": rel.toFixed(4), title: `relevancy ${rel.toFixed(4)}` },
        el("span", { class: "tok-text", text: texts ? (texts[i] ?? "") : "#" + r.token_ids[i] }),
        el("span", { class: "tok-rel", text: rel.toFixed(3) }));
      chip.style.background = color(v);
      chip.style.color = textColor(v);
      return chip;
    }));
  }

  function showDetail(r, flags) {
    const key = r.layer + ":" + r.token;
    const strip = tokenStrip(r, null);
    $("detail").dataset.cell = key;
    $("detail").replaceChildren(
      flags ? el("div", { class: "error", text: "flagged: " + flags.map(f => `${f.detector}: ${f.label} ("${f.match}")`).join("; ") }) : "",
      el("div", { class: "muted", text: `layer ${r.layer} · token ${r.token} ${JSON.stringify(r.source_token)} · mean relevancy ${r.mean_relevancy.toFixed(4)}`
                                        + (r.grounded === false ? ` · not grounded: ${REASONS[r.ungrounded_reason] || r.ungrounded_reason}`
                                           : r.grounded ? " · grounded" : "") }),
      el("div", { class: "text", id: "detail-text", text: r.text }),
      el("div", { class: "muted", text: "generated tokens, shaded by relevancy (how much the injected state caused each):" }),
      strip,
    );
    generatedTokens(r).then(texts => {
      if ($("detail").dataset.cell === key) strip.replaceWith(tokenStrip(r, texts));
    }).catch(e => { $("error").textContent = e.message; });
  }

  // A cell's text: fractional numbers rounded, null empty, anything else as it is (an edit's rows hold lists of
  // interpretations and of rewards beside its losses).
  function cellText(v, digits) {
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
    if (v == null) return "";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  async function showRows(job) {
    // Any kind's rows, paged from /results exactly as a client reads them; relevancy colors the mean column.
    $("grid-controls").hidden = true;
    $("detail").hidden = true;
    const rows = [];
    let columns = [], cursor = null, variant = null;
    do {
      const q = new URLSearchParams({ limit: 1000 });
      if (cursor) q.set("cursor", cursor);
      const page = await api(`/v1/jobs/${jobId}/results?` + q);
      columns = page.columns;
      rows.push(...page.items);
      variant = page.variant || variant;  // an edit job's results name the variant it stored
      cursor = page.next_cursor;
    } while (cursor);
    const shown = columns.filter(c => !["token_ids", "worker", "model", "created_at"].includes(c));
    const maxRel = Math.max(1e-9, ...rows.map(r => r.mean_relevancy ?? 0));
    const table = $("rows");
    table.replaceChildren(el("thead", {}, el("tr", {}, ...shown.map(c => el("th", { text: c })))));
    const body = el("tbody");
    for (const r of rows) {
      const tr = el("tr", { "data-index": r.vector_index ?? "" });
      for (const c of shown) {
        const v = r[c];
        const text = Array.isArray(v) ? v.map(x => cellText(x, 3)).join(v.some(x => typeof x === "string") ? " | " : " ") : cellText(v, 4);
        const td = el("td", { "data-column": c, text });
        if (c === "mean_relevancy") { td.style.background = color(v / maxRel); td.style.color = textColor(v / maxRel); }
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    $("rows-info").replaceChildren(`${rows.length} ${job.kind} results`);
    if (variant) $("rows-info").append(" · the variant it stored: ", el("a", { id: "variant-link", href: `/ui/variants/${variant.id}`, text: variant.id }));
    $("rows-card").hidden = false;
  }

  // A lenses job: per prompt, the layer x token grid of one lens's top-1 token, shaded by its probability (the
  // picture of the logit-lens papers); the lens is switched without reading the rows again.
  const lens = { rows: [] };
  async function showLenses(job) {
    $("grid-controls").hidden = true;
    $("detail").hidden = true;
    let cursor = null;
    do {
      const q = new URLSearchParams({ limit: 1000 });
      if (cursor) q.set("cursor", cursor);
      const page = await api(`/v1/jobs/${jobId}/results?` + q);
      lens.rows.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    for (const p of job.prompts) $("lens-prompt").append(el("option", { value: p.index, text: `${p.index}: ${p.text.slice(0, 60)}` }));
    // the lenses this job ran, and the model's own prediction, which every job has
    const ran = new Set(["model", ...["logit", "identity"].filter(n => lens.rows.some(r => r[n + "_tokens"]))]);
    for (const o of [...$("lens").options]) if (!ran.has(o.value)) o.remove();
    $("lens-prompt").onchange = renderLens;
    $("lens").onchange = renderLens;
    $("lens-legend").style.background = `linear-gradient(to right, ${color(0)}, ${color(0.5)}, ${color(1)})`;
    $("lens-card").hidden = false;
    renderLens();
  }

  function renderLens() {
    const prompt = +$("lens-prompt").value || 0;
    const name = $("lens").value;
    const p = state.job.prompts.find(x => x.index === prompt) || { tokens: [] };
    const rows = lens.rows.filter(r => r.prompt_index === prompt);
    const layers = [...new Set(rows.map(r => r.layer))].sort((a, b) => a - b);
    const tokens = [...new Set(rows.map(r => r.token))].sort((a, b) => a - b);
    const at = new Map(rows.map(r => [r.layer + ":" + r.token, r]));
    const table = $("lens-grid");
    table.replaceChildren();
    const head = el("tr", {}, el("th", { class: "layer", text: "layer \\ token" }));
    for (const t of tokens) head.append(el("th", { "data-token": t, text: JSON.stringify(p.tokens[t] ?? String(t)).slice(1, -1) || " " }));
    table.append(el("thead", {}, head));
    const body = el("tbody");
    let matches = 0;
    for (const l of [...layers].reverse()) {  // the last layer on top, as in the logit-lens papers
      const tr = el("tr", {}, el("th", { class: "layer", text: String(l) }));
      for (const t of tokens) {
        const r = at.get(l + ":" + t);
        if (!r || !r[name + "_tokens"]) { tr.append(el("td", { class: "cell empty" })); continue; }
        const top = r[name + "_tokens"][0], prob = r[name + "_probs"][0];
        const match = r[name + "_token_ids"][0] === r.model_token_ids[0];
        if (match) matches++;
        const alternatives = r[name + "_tokens"].map((tok, i) => `${JSON.stringify(tok)} ${r[name + "_probs"][i].toFixed(3)}`).join(", ");
        const td = el("td", { class: "cell lens" + (match ? " match" : ""), "data-layer": l, "data-token": t,
                              "data-prob": prob.toFixed(4), "data-top": top,
                              title: `layer ${l}, token ${t} ${JSON.stringify(r.source_token)}: ${alternatives}; the model predicts ${JSON.stringify(r.model_tokens[0])}` });
        td.textContent = JSON.stringify(top).slice(1, -1) || " ";
        td.style.background = color(prob);
        td.style.color = textColor(prob);
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    $("lens-info").textContent = `${rows.length} states, ${layers.length} layers x ${tokens.length} tokens; top-1 is the model's own in ${matches}`;
  }

  async function main() {
    Selfie.setupKeyBox();
    $("job-id").textContent = jobId;
    try {
      state.job = await api(`/v1/jobs/${jobId}`);
    } catch (e) { $("error").textContent = e.message; return; }
    const job = state.job;
    showStatus(job);
    if (job.kind === "lenses") {
      $("dl-lens-csv").onclick = () => download(`/v1/jobs/${jobId}/results?format=csv`, `selfie-${jobId}.csv`);
      try { await showLenses(job); } catch (e) { $("error").textContent = e.message; }
      document.body.dataset.ready = "1";
      return;
    }
    if (job.kind && job.kind !== "interpret") {
      $("dl-rows-csv").onclick = () => download(`/v1/jobs/${jobId}/results?format=csv`, `selfie-${jobId}.csv`);
      try { await showRows(job); } catch (e) { $("error").textContent = e.message; }
      document.body.dataset.ready = "1";
      followJob(job);
      return;
    }
    for (const p of job.prompts) $("prompt").append(el("option", { value: p.index, text: `${p.index}: ${p.text.slice(0, 60)}` }));
    const wanted = +(new URLSearchParams(location.search).get("prompt") || 0);
    $("prompt").value = wanted;
    $("prompt").onchange = () => loadPrompt(+$("prompt").value).catch(e => $("error").textContent = e.message);
    $("flagged-only").onchange = render;
    $("grounded-only").onchange = render;
    showBaseline(job);
    for (const id of ["min-rel", "search", "layer-min", "layer-max", "scale"]) $(id).oninput = () => {
      $("min-rel-val").textContent = (+$("min-rel").value).toFixed(2); render();
    };
    $("dl-csv").onclick = () => download(`/v1/jobs/${jobId}/interpretations?format=csv`, `selfie-${jobId}.csv`);
    $("dl-json").onclick = () => saveBlob(new Blob([JSON.stringify([...state.cells.values()], null, 1)], { type: "application/json" }),
                                          `selfie-${jobId}-prompt${state.prompt}.json`);
    try { await loadPrompt(job.prompts.length ? wanted : 0); } catch (e) { $("error").textContent = e.message; }
    document.body.dataset.ready = "1";
    followJob(job);
  }

  const FINAL = new Set(["succeeded", "failed", "cancelled"]);

  function showStatus(s) {
    const p = s.progress;
    const live = [`${p.done}/${p.total}`];
    if (p.in_flight) live.push(`${p.in_flight} decoding` + (p.decode_steps ? ` (step ${p.decode_step}/${p.decode_steps})` : ""));
    if (p.eta_seconds != null) live.push(`ETA ${Math.round(p.eta_seconds)} s`);
    $("job-state").replaceChildren(Selfie.badge(s.state));
    if (s.edit) {  // an edit's one item is the whole edit: its epochs are the progress worth showing
      live[0] = `epoch ${s.edit.epochs_done}/${s.edit.epochs_total}`;
      if (s.state === "running" && s.edit.epochs_done >= s.edit.epochs_total) live.push("evaluating base model and variant");
    }
    $("job-progress").textContent = `${live.join(", ")} · ${s.model} · ${s.kind}`;
    const variant = s.spec && s.spec.variant;
    if (variant) $("job-progress").append(" · on variant ", el("a", { href: `/ui/variants/${variant}`, text: variant }));
    document.body.dataset.state = s.state;
  }

  // While the job runs, its status arrives as server-sent events; each time more results are stored, the grid
  // reads the prompt shown again. Polling takes over when the stream is refused or drops.
  async function followJob(job) {
    let done = job.progress.done;
    const update = async s => {
      showStatus(s);
      if (s.progress.done !== done || FINAL.has(s.state)) {
        done = s.progress.done;
        if (job.kind && job.kind !== "interpret") await showRows(job); else await loadPrompt(state.prompt);
      }
      if (FINAL.has(s.state)) document.body.dataset.final = "1";
    };
    if (FINAL.has(job.state)) { document.body.dataset.final = "1"; return; }
    let last = job, chain = Promise.resolve();
    try {
      await Selfie.follow(`/v1/jobs/${jobId}/events`, (name, data) => {
        if (name !== "status" && name !== "end") return;
        const s = last = JSON.parse(data);
        chain = chain.then(() => update(s)).catch(e => { $("error").textContent = e.message; });  // one reload at a time
      });
    } catch (e) { /* no stream: poll below */ }
    await chain;
    while (!FINAL.has(last.state)) {
      await new Promise(r => setTimeout(r, 2000));
      try { last = await api(`/v1/jobs/${jobId}?include_prompts=false`); await update(last); }
      catch (e) { $("error").textContent = e.message; return; }
    }
  }
  main();
})();
