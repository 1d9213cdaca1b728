// The audit page: runs with progress, flags per layer and per token position as SVG charts, top findings, diff.
"use strict";
(() => {
  const { api, download, el, barChart, badge, progress, fmtTime } = Selfie;
  const auditId = location.pathname.split("/").filter(Boolean).pop();
  const $ = id => document.getElementById(id);
  let selected = new URLSearchParams(location.search).get("run");
  let timer = null;

  function fill(bars) {  // every layer from 0 to the largest, so the x axis reads as depth
    if (!bars.length) return [];
    const byKey = new Map(bars.map(b => [b.key, b]));
    const keys = bars.map(b => b.key), lo = Math.min(0, ...keys), hi = Math.max(...keys);
    const out = [];
    for (let k = lo; k <= hi; k++) { const b = byKey.get(k); out.push({ key: k, value: b ? b.flags : 0, title: `${k}: ${b ? b.flags : 0} flags, ${b ? b.prompts : 0} prompts` }); }
    return out;
  }

  async function loadRuns() {
    const data = await api(`/v1/audits/${auditId}/runs`);
    const tbody = $("runs").querySelector("tbody");
    tbody.replaceChildren();
    for (const r of data.runs) {
      const p = r.progress;
      tbody.append(el("tr", { "data-run": r.id },
        el("td", {}, el("a", { href: `?run=${r.id}`, text: "#" + r.id })),
        el("td", {}, badge(r.state)),
        el("td", { text: r.trigger }),
        el("td", {}, progress(p.fraction), el("span", { class: "muted", text: ` ${p.interpretations_done}/${p.interpretations_total} · ${p.prompts_submitted}/${p.prompts_total} prompts` })),
        el("td", { text: String(p.flags) }),
        el("td", { text: fmtTime(r.started_at) }),
        el("td", { text: fmtTime(r.finished_at) }),
        el("td", {}, r.error ? el("span", { class: "error", text: r.error }) : null)));
    }
    if (!selected && data.runs.length) selected = String(data.runs[0].id);
    const open = data.runs.some(r => ["pending", "submitting", "running"].includes(r.state));
    clearTimeout(timer);
    if (open) timer = setTimeout(() => refresh().catch(showError), 3000);
  }

  async function loadReport() {
    if (!selected) { $("run-summary").textContent = "no run yet"; return; }
    const rep = await api(`/v1/audit-runs/${selected}/report?top=25`);
    $("run-id").textContent = "#" + rep.run_id;
    $("run-summary").textContent = `${rep.state} · ${rep.flags} flags on ${rep.flagged_prompts} prompts · ${rep.progress.interpretations_scanned} interpretations scanned`;
    $("chart-layer").replaceChildren(barChart(fill(rep.by_layer), { id: "layer-chart", xlabel: "layer" }));
    $("chart-token").replaceChildren(barChart(rep.by_token_from_end.map(b => ({ key: b.key, value: b.flags })), { id: "token-chart", fill: "#6b8fd6", height: 140, xlabel: "token position (-1 = last)" }));
    const d = rep.diff;
    if (d.previous_run_id == null) $("diff").textContent = "first run of this audit: nothing to compare with.";
    else {
      const list = (items) => el("ul", {}, ...items.slice(0, 10).map(f => el("li", { text: `layer ${f.layer}, token ${f.token} ${JSON.stringify(f.source_token)}: ${f.label} in "${f.text.trim()}"` })));
      $("diff").replaceChildren(
        el("div", { text: `compared with run #${d.previous_run_id}: ${d.new_count} new, ${d.gone_count} gone` }),
        el("div", {}, el("b", { text: "new" }), list(d.new)), el("div", {}, el("b", { text: "gone" }), list(d.gone)));
    }
    const tbody = $("top").querySelector("tbody");
    tbody.replaceChildren();
    for (const f of rep.top) {
      const c = f.context || { before: "", token: f.source_token, after: "" };
      tbody.append(el("tr", {},
        el("td", { text: f.mean_relevancy.toFixed(3) }), el("td", { text: String(f.layer) }), el("td", { text: `${f.token} (${f.token_from_end})` }),
        el("td", { text: `${f.detector}: ${f.label}` }), el("td", { text: f.text.trim() }),
        el("td", {}, el("div", { text: f.prompt || "" }), el("div", { class: "ctx muted" }, c.before, el("b", { text: c.token }), c.after)),
        el("td", {}, el("a", { href: `/ui/jobs/${f.job_id}?prompt=${f.prompt_index}`, text: "grid" }))));
    }
  }

  async function refresh() { await loadRuns(); await loadReport(); document.body.dataset.ready = "1"; }
  function showError(e) { $("error").textContent = e.message; }

  async function main() {
    Selfie.setupKeyBox();
    try {
      const a = await api(`/v1/audits/${auditId}`);
      $("audit-name").textContent = a.name;
      $("audit-info").textContent = `${a.model} · prompt set ${a.prompt_set} · ${a.detectors.map(d => d.name).join(", ")}`;
      $("schedule").textContent = a.schedule ? `schedule ${a.schedule} (UTC), next ${fmtTime(a.next_run_at)}` : "no schedule";
      $("start").onclick = async () => { const r = await api(`/v1/audits/${auditId}/runs`, { method: "POST" }); selected = String(r.id); refresh().catch(showError); };
      $("dl-csv").onclick = () => selected && download(`/v1/audit-runs/${selected}/findings?format=csv`, `audit-run-${selected}.csv`);
      await refresh();
    } catch (e) { showError(e); }
  }
  main();
})();
