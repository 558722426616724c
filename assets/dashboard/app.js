// Switchyard dashboard: polls /admin/stats and draws the charts on canvas. No libraries,
// no network beyond this server, so it works offline.
"use strict";
const POLL_MS = 2000;
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
let windowName = "1m";
let renders = 0;

function fmtMs(v) { return v == null ? "–" : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : Math.round(v).toString(); }
function fmtPct(v) { return v == null ? "–" : (v * 100).toFixed(v < 0.1 ? 2 : 1) + "%"; }
function fmtDur(s) { const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60); return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`; }
function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

// A line chart: series = [{color, values: [...]}], times = [ms...]. Marks the canvas with
// the number of points drawn (data-points) so tests can see it rendered with data.
function chart(id, times, series, opts = {}) {
  const canvas = document.getElementById(id);
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 46, r: 10, t: 8, b: 22 };
  const all = series.flatMap((s) => s.values).filter((v) => v != null && isFinite(v));
  let max = Math.max(opts.minMax || 0, ...all, 0);
  if (max === 0) max = 1;
  max = niceCeil(max);
  g.font = "11px " + css("--mono");
  g.fillStyle = css("--muted");
  g.strokeStyle = css("--border");
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (h - pad.t - pad.b) * (1 - i / 4);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
    const label = max * i / 4;
    g.textAlign = "right"; g.textBaseline = "middle";
    g.fillText(label >= 100 ? Math.round(label) : +label.toFixed(2), pad.l - 6, y);
  }
  let points = 0;
  if (times.length > 0) {
    const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 1);
    const x = (t) => pad.l + (w - pad.l - pad.r) * (t - t0) / (t1 - t0);
    const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - v / max);
    g.textAlign = "center"; g.textBaseline = "top";
    for (const t of [t0, (t0 + t1) / 2, t1]) g.fillText(new Date(t).toLocaleTimeString(), Math.min(Math.max(x(t), pad.l + 24), w - pad.r - 24), h - pad.b + 6);
    for (const s of series) {
      g.strokeStyle = s.color; g.lineWidth = 1.8; g.beginPath();
      let started = false;
      s.values.forEach((v, i) => {
        if (v == null || !isFinite(v)) return;
        const px = x(times[i]), py = y(v);
        if (started) g.lineTo(px, py); else { g.moveTo(px, py); started = true; }
        points++;
      });
      g.stroke();
      if (s.fill && started) {
        g.lineTo(x(times[times.length - 1]), y(0)); g.lineTo(x(times[0]), y(0)); g.closePath();
        g.globalAlpha = 0.12; g.fillStyle = s.color; g.fill(); g.globalAlpha = 1;
      }
    }
  } else {
    g.fillStyle = css("--muted"); g.textAlign = "center"; g.textBaseline = "middle";
    g.fillText("waiting for the first sample…", w / 2, h / 2);
  }
  canvas.dataset.points = points;
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function render(stats) {
  const tl = stats.timeline || [];
  const times = tl.map((s) => s.t);
  const last = tl[tl.length - 1] || {};
  chart("c-rps", times, [{ color: css("--accent"), values: tl.map((s) => s.rps), fill: true }]);
  chart("c-latency", times, [
    { color: css("--green"), values: tl.map((s) => s.rps > 0 ? s.p50_ms : null) },
    { color: css("--yellow"), values: tl.map((s) => s.rps > 0 ? s.p95_ms : null) },
    { color: css("--red"), values: tl.map((s) => s.rps > 0 ? s.p99_ms : null) },
  ]);
  chart("c-errors", times, [{ color: css("--red"), values: tl.map((s) => s.error_rate * 100), fill: true }], { minMax: 1 });
  chart("c-queue", times, [
    { color: css("--purple"), values: tl.map((s) => s.queue_depth) },
    { color: css("--accent"), values: tl.map((s) => s.in_flight) },
  ], { minMax: 1 });
  chart("c-cache", times, [{ color: css("--green"), values: tl.map((s) => s.cache_hit_rate * 100), fill: true }], { minMax: 1 });
  chart("c-rss", times, [{ color: css("--purple"), values: tl.map((s) => s.rss_bytes / 1048576), fill: true }]);

  document.getElementById("t-rps").innerHTML = last.rps != null ? `${last.rps.toFixed(1)}` : "–";
  document.getElementById("t-p50").innerHTML = last.rps > 0 ? `${fmtMs(last.p50_ms)}<small> ms</small>` : "–";
  document.getElementById("t-p99").innerHTML = last.rps > 0 ? `${fmtMs(last.p99_ms)}<small> ms</small>` : "–";
  document.getElementById("t-err").textContent = fmtPct(last.error_rate);
  document.getElementById("t-cache").textContent = stats.cache ? fmtPct(stats.cache.hit_rate) : "–";
  document.getElementById("t-queue").innerHTML = `${stats.admission.queued}<small> / ${stats.admission.in_flight}</small>`;
  document.getElementById("t-rss").innerHTML = `${(stats.rss_bytes / 1048576).toFixed(1)}<small> MiB</small>`;
  document.getElementById("uptime").textContent = "up " + fmtDur(stats.uptime_s);
  const sessions = stats.sessions;
  document.getElementById("t-conv").innerHTML = sessions
    ? `${sessions.conversations}<small> / ${sessions.active_last_hour}</small>` : "–";
  document.getElementById("t-items").textContent = sessions ? sessions.avg_items_per_conversation.toFixed(1) : "–";
  document.getElementById("t-session").textContent = sessions ? fmtDur(Math.round(sessions.avg_session_seconds)) : "–";

  const deps = stats.deployments || [];
  document.getElementById("deployments").innerHTML = deps.length ? deps.map((d) => `<tr>
    <td class="name">${esc(d.id)}</td><td><span class="badge ${d.circuit.state}">${d.circuit.state.replace("_", "-")}</span></td>
    <td>${d.in_flight}</td><td>${fmtMs(d.ewma_latency_ms)} ms</td><td>${fmtPct(d.error_rate)}</td>
    <td>${d.requests}</td><td>${d.pool.connections}</td><td>${fmtPct(d.pool.reuse_rate)}</td></tr>`).join("")
    : `<tr><td colspan="8" class="empty">no deployments</td></tr>`;
  const tools = stats.tools || [];
  document.getElementById("tools").innerHTML = tools.length ? tools.map((t) => `<tr>
    <td class="name">${esc(t.name)}</td><td>${t.circuit ? `<span class="badge ${t.circuit}">${t.circuit.replace("_", "-")}</span>` : "–"}</td>
    <td>${t.calls}</td><td>${t.errors}</td><td>${t.cached}</td><td>${fmtMs(t.mean_ms)} ms</td></tr>`).join("")
    : `<tr><td colspan="6" class="empty">no tools configured</td></tr>`;
  const mem = stats.memory;
  document.getElementById("memory").innerHTML = mem ? `<tr>
    <td>${mem.jobs ? mem.jobs.queued : "–"}</td><td>${mem.jobs ? mem.jobs.running : "–"}</td>
    <td>${mem.completed}</td><td>${fmtMs(mem.mean_job_ms)} ms</td><td>${mem.jobs ? mem.jobs.failed : mem.failed}</td><td>${mem.dropped}</td>
    <td>${mem.decisions.add}</td><td>${mem.decisions.update}</td><td>${mem.decisions.delete}</td>
    <td>${mem.decisions.none}</td><td>${mem.indexed_subjects}</td></tr>`
    : `<tr><td colspan="11" class="empty">no memory figures yet</td></tr>`;
  const bg = stats.background;
  document.getElementById("background").innerHTML = bg ? `<tr>
    <td>${bg.jobs ? bg.jobs.queued : "–"}</td><td>${bg.jobs ? bg.jobs.running : "–"}</td>
    <td>${bg.completed}</td><td>${bg.failed}</td><td>${bg.cancelled}</td><td>${bg.retried}</td>
    <td>${bg.lease_expired}</td><td>${bg.claim_wait_ms ? `${bg.claim_wait_ms.p50} / ${bg.claim_wait_ms.p99}` : "–"} ms</td><td>${bg.workers}</td></tr>`
    : `<tr><td colspan="9" class="empty">no job figures yet</td></tr>`;
  const rows = (stats.windows && stats.windows[windowName]) || [];
  document.getElementById("routes").innerHTML = rows.length ? rows.map((r) => `<tr>
    <td class="name">${esc(r.route)}</td><td class="name">${esc(r.model)}</td><td>${r.requests}</td><td>${r.errors}</td>
    <td>${fmtMs(r.p50_ms)}</td><td>${fmtMs(r.p95_ms)}</td><td>${fmtMs(r.p99_ms)}</td><td>${fmtMs(r.max_ms)}</td></tr>`).join("")
    : `<tr><td colspan="8" class="empty">no traffic in this window</td></tr>`;
  renders++;
  document.body.dataset.renders = renders;
}

let latest = null;
async function poll() {
  try {
    const r = await fetch("/admin/stats", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { location.href = "/dashboard"; return; }
    latest = await r.json();
    render(latest);
    document.getElementById("live").classList.remove("stale");
    document.getElementById("updated").textContent = "live · " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("live").classList.add("stale");
    document.getElementById("updated").textContent = "disconnected";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("windows").addEventListener("click", (e) => {
  const w = e.target.dataset && e.target.dataset.w;
  if (!w) return;
  windowName = w;
  for (const b of document.querySelectorAll("#windows button")) b.classList.toggle("on", b.dataset.w === w);
  if (latest) render(latest);
});
window.addEventListener("resize", () => latest && render(latest));
poll();
