// The variant page: what an edit did (its settings), how it trained (loss curve or judged-bad share as SVG), and
// the base model against the variant (interpretation of the source state, greedy answer, benchmark figures).
"use strict";
(() => {
  const { api, el, barChart, lineChart, fmtTime } = Selfie;
  const variantId = location.pathname.split("/").filter(Boolean).pop();
  const $ = id => document.getElementById(id);
  const pct = v => (v == null || !Number.isFinite(v)) ? "n/a" : (100 * v).toFixed(1) + "%";
  const num = v => (v == null || !Number.isFinite(v)) ? "n/a" : (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toFixed(4) : v.toExponential(3));

  function showError(e) { $("error").textContent = String(e && e.message ? e.message : e); }

  function settingsTable(v) {
    const tbody = $("settings").querySelector("tbody");
    const rows = [["method", v.method], ["base model", v.model], ["layer", `${v.layer} (the MLP of block ${v.layer - 1})`],
                  ["edit job", el("a", { href: `/ui/jobs/${v.job_id}`, text: v.job_id })], ["sha256", v.sha256],
                  ["created", fmtTime(v.created_at)]];
    // the edit's own settings; what the rows above show (method, layer) and what was not set (null, an empty list
    // of evaluations: the before/after section shows those that ran) are left out
    for (const [k, val] of Object.entries(v.settings || {})) {
      if (["method", "layer"].includes(k) || val == null || (Array.isArray(val) && !val.length)) continue;
      rows.push([k, typeof val === "object" ? JSON.stringify(val) : String(val)]);
    }
    tbody.replaceChildren(...rows.map(([k, val]) => el("tr", {}, el("th", { text: k }), el("td", {}, val))));
  }

  function curve(v) {
    const losses = v.losses || [];
    const series = [];
    if (v.method === "reinforce") {
      series.push({ name: "judged bad (share)", color: "#c0392b", points: losses.map(e => [e.epoch, e.bad_share]) });
      $("curve").append(lineChart(series, { id: "loss-curve", xlabel: "epoch", zero: true }));
      const first = losses.find(e => e.bad_share != null), last = [...losses].reverse().find(e => e.bad_share != null);
      if (first && last) $("curve-note").textContent = `judged bad: ${pct(first.bad_share)} at epoch ${first.epoch}, ${pct(last.bad_share)} at epoch ${last.epoch}`;
      return;
    }
    series.push({ name: "edit loss", color: "#2453a6", points: losses.map(e => [e.epoch, e.edit_loss]) });
    if (losses.some(e => e.keep_loss != null)) series.push({ name: "keep loss", color: "#7a8a3a", points: losses.map(e => [e.epoch, e.keep_loss]) });
    $("curve").append(lineChart(series, { id: "loss-curve", xlabel: "epoch", log: true }));
    const first = losses.find(e => e.edit_loss > 0), last = [...losses].reverse().find(e => e.edit_loss > 0);
    if (first && last) $("curve-note").textContent = `edit loss ${num(first.edit_loss)} -> ${num(last.edit_loss)} (${(first.edit_loss / last.edit_loss).toFixed(0)}x lower) over ${losses.length} epochs (log scale)`;
  }

  function beforeAfter(ev) {
    const tbody = $("before-after").querySelector("tbody");
    const rows = [];
    const row = (what, base, variant, key) => rows.push(el("tr", { "data-row": key }, el("th", { text: what }),
      el("td", { class: "base", text: base == null ? "" : String(base) }), el("td", { class: "variant", text: variant == null ? "" : String(variant) })));
    if (ev.objective) row(ev.objective.name === "bad_share" ? "judged bad (share of positions)" : "source state's distance to the target",
                          ev.objective.name === "bad_share" ? pct(ev.objective.base) : num(ev.objective.base),
                          ev.objective.name === "bad_share" ? pct(ev.objective.variant) : num(ev.objective.variant), "objective");
    if (ev.interpretation) {
      const i = ev.interpretation;
      row(`interpretation of layer ${i.layer}, token ${i.token}`, i.base, i.variant, "interpretation");
      if (i.target != null) rows.push(el("tr", { "data-row": "target" }, el("th", { text: "the target's interpretation" }), el("td", { colspan: 2, class: "muted", text: i.target })));
    }
    if (ev.answer) row("greedy answer to the source prompt", ev.answer.base, ev.answer.variant, "answer");
    if (ev.knowledge) row(`facts known (of ${ev.knowledge.facts})`, pct(ev.knowledge.base_accuracy), pct(ev.knowledge.edited_accuracy), "knowledge");
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "no evaluations were run" })));
  }

  function benchmarks(ev) {
    const box = $("benchmarks");
    box.replaceChildren();
    if (ev.knowledge) {
      const k = ev.knowledge;
      box.append(el("p", { id: "knowledge-summary", text: `Knowledge preservation: the base model answers ${k.known} of ${k.facts} facts; the variant keeps ${pct(k.kept_of_known)} of those.` }));
      box.append(barChart([{ key: "base", value: 100, title: `base: ${k.known} known facts` },
                           { key: "variant", value: 100 * k.kept_of_known, title: `variant: ${pct(k.kept_of_known)} kept` }],
                          { id: "knowledge-chart", height: 140, xlabel: "known facts answered (%)" }));
      if (k.known_facts && k.known_facts.length) $("known-facts").textContent = "Facts the base model knows: " + k.known_facts.join(" · ");
    }
    if (ev.behaviour) {
      const b = ev.behaviour;
      box.append(el("p", { id: "behaviour-summary", text: `Harmful-behaviour benchmark: ${b.requests} requests, responses flagged by ${b.detector}.` }));
      const bars = [];
      for (const who of ["base", "variant"]) for (const [how, key] of [["plain", "plain_hit_rate"], ["injected", "injected_hit_rate"]]) {
        const v = b[who] ? b[who][key] : null;
        if (v != null) bars.push({ key: `${who} ${how}`, value: 100 * v, title: `${who}, ${how}: ${pct(v)} flagged` });
      }
      box.append(barChart(bars, { id: "behaviour-chart", height: 160, fill: "#c0392b", xlabel: "responses flagged (%)" }));
    }
    if (!ev.knowledge && !ev.behaviour) box.append(el("p", { class: "muted", text: "no benchmarks were run for this edit" }));
  }

  async function load() {
    Selfie.setupKeyBox();
    const v = await api(`/v1/variants/${encodeURIComponent(variantId)}`);
    $("variant-id").textContent = v.id;
    $("variant-info").textContent = `${v.method} edit of ${v.model}, layer ${v.layer}`;
    settingsTable(v);
    curve(v);
    beforeAfter(v.evaluations || {});
    benchmarks(v.evaluations || {});
    document.body.dataset.loaded = "1";
  }

  load().catch(showError);
})();
