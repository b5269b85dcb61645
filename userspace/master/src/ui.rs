//! The Networks page (`/overlay-master/ui`): what DC/OS's web UI showed under Networks, served
//! by the master itself as one self-contained page (no external scripts, styles or fonts):
//! networks with their subnets and address use per agent, agents with VTEP, MAC, status and
//! last heartbeat, the containers on each network, a search by address, drops per network.
//!
//! The page is static and public; its data (`/overlay-master/ui/data`) needs read access like
//! the state: the page sends the admin token given in its URL fragment (`#token=...`, never
//! sent to the server by the browser) or typed into it, kept in the tab's session storage.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::ApiError;
use crate::auth::Authenticated;
use crate::master::Master;

#[derive(Serialize)]
pub struct PageData {
    revision: u64,
    networks: Vec<NetworkView>,
    agents: Vec<AgentView>,
    endpoints: Vec<overlay_api::ClusterEndpoint>,
}

#[derive(Serialize)]
struct NetworkView {
    name: String,
    vni: u32,
    subnet: Option<String>,
    prefix: Option<u8>,
    subnet6: Option<String>,
    prefix6: Option<u8>,
    enabled: bool,
    masquerade: bool,
    /// Each agent's share and how many of its addresses containers use, per family.
    usage: Vec<NetworkUsage>,
    /// Drops by reason, summed over the agents' reports.
    drops: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct NetworkUsage {
    agent: IpAddr,
    subnet: Option<String>,
    subnet6: Option<String>,
    used_v4: usize,
    used_v6: usize,
}

#[derive(Serialize)]
struct AgentView {
    ip: IpAddr,
    vtep_ip: Option<String>,
    vtep_mac: Option<String>,
    status: String,
    last_heartbeat_seconds_ago: Option<f64>,
    endpoints: usize,
}

/// The page's data: the state, the agents' liveness and what they reported.
pub async fn data(
    State(master): State<Arc<Master>>,
    who: Authenticated,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "the Networks page")?;
    let body = master.state_body().await;
    let state: overlay_api::State = serde_json::from_slice(&body.state_json()).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the state: {e}"),
        )
    })?;
    let liveness = master.liveness();
    let reports = master.reports();
    let endpoints = master.endpoints();
    let networks = state
        .network
        .overlays
        .iter()
        .map(|o| {
            let usage = state
                .agents
                .iter()
                .filter_map(|a| {
                    let share = a.overlays.iter().find(|s| s.info.name == o.name)?;
                    let on_it = endpoints
                        .iter()
                        .filter(|e| e.agent == a.ip && e.endpoint.network == o.name);
                    let (v4, v6): (Vec<_>, Vec<_>) = on_it.partition(|e| e.endpoint.ip.is_ipv4());
                    Some(NetworkUsage {
                        agent: a.ip,
                        subnet: share.subnet.map(|s| s.to_string()),
                        subnet6: share.subnet6.map(|s| s.to_string()),
                        used_v4: v4.len(),
                        used_v6: v6.len(),
                    })
                })
                .collect();
            let mut drops = BTreeMap::new();
            for report in reports.values() {
                for (reason, n) in report.drops.get(&o.name).into_iter().flatten() {
                    *drops.entry(reason.clone()).or_default() += n;
                }
            }
            NetworkView {
                name: o.name.clone(),
                vni: o.wire_vni(),
                subnet: o.subnet.map(|s| s.to_string()),
                prefix: o.prefix,
                subnet6: o.subnet6.map(|s| s.to_string()),
                prefix6: o.prefix6,
                enabled: o.is_enabled(),
                masquerade: o.masquerades(),
                usage,
                drops,
            }
        })
        .collect();
    let agents = state
        .agents
        .iter()
        .map(|a| {
            let (vtep_ip, vtep_mac) = a.vtep_text();
            let live = liveness.iter().find(|l| l.ip == a.ip);
            AgentView {
                ip: a.ip,
                vtep_ip,
                vtep_mac,
                status: live.map_or_else(|| "unknown".into(), |l| l.status.clone()),
                last_heartbeat_seconds_ago: live.and_then(|l| l.last_heartbeat_seconds_ago),
                endpoints: endpoints.iter().filter(|e| e.agent == a.ip).count(),
            }
        })
        .collect();
    Ok(Json(PageData {
        revision: body.revision,
        networks,
        agents,
        endpoints,
    })
    .into_response())
}

/// The page itself (public: it holds no data).
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing may be fetched from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:",
            ),
        ],
        PAGE,
    )
        .into_response()
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Networks · ebpf-overlay</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d2433;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0;font-weight:600}
header .meta{opacity:.7;font-size:12px}
main{padding:16px 20px;display:grid;gap:16px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}
th{font-weight:600;color:#5b6474;font-size:12px;text-transform:uppercase}
.off{color:#a33}.ok{color:#2a7d3b}.stale{color:#b26a00}
input{font:inherit;padding:5px 8px;border:1px solid #c5cbd4;border-radius:4px;width:260px}
#result{margin-top:8px}
#error{color:#a33}
.small{font-size:12px;color:#5b6474}
</style></head><body>
<header><h1>Networks</h1><span class="meta" id="meta">loading…</span><span id="error"></span></header>
<main>
<section><h2>Where is…</h2>
<input id="search" placeholder="address, e.g. 9.0.3.7" autocomplete="off">
<span class="small">token <input id="token" type="password" placeholder="admin token (if needed)" style="width:200px"></span>
<div id="result"></div></section>
<section><h2>Virtual networks</h2><table id="networks"><thead><tr><th>Name</th><th>VNI</th><th>Subnet</th><th>Subnet6</th><th>State</th><th>Address use per agent</th><th>Containers</th><th>Drops</th></tr></thead><tbody></tbody></table></section>
<section><h2>Agents</h2><table id="agents"><thead><tr><th>Agent</th><th>VTEP</th><th>VTEP MAC</th><th>Status</th><th>Last heartbeat</th><th>Containers</th></tr></thead><tbody></tbody></table></section>
<section><h2>Containers</h2><table id="containers"><thead><tr><th>Address</th><th>Network</th><th>Agent</th><th>Container</th><th>Interface</th><th>MAC</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const tokenFromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (tokenFromHash) { sessionStorage.setItem("overlay-token", tokenFromHash); history.replaceState(null, "", location.pathname); }
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("overlay-token") || "";
tokenInput.addEventListener("change", () => { sessionStorage.setItem("overlay-token", tokenInput.value); refresh(); });
let data = null;
function esc(s) { return String(s ?? "-").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }
function rows(id, list, cells) {
  document.querySelector("#" + id + " tbody").innerHTML = list.map(x => "<tr>" + cells(x).map(c => "<td>" + c + "</td>").join("") + "</tr>").join("");
}
function v4(ip) { const p = ip.split("."); if (p.length !== 4 || p.some(x => !/^\d+$/.test(x) || +x > 255)) return null; return p.reduce((a, x) => a * 256 + +x, 0); }
function inSubnet(ip, cidr) {
  if (!cidr) return false; const [net, len] = cidr.split("/"); const a = v4(ip), n = v4(net);
  if (a === null || n === null) return false; const size = 2 ** (32 - +len); return Math.floor(a / size) === Math.floor(n / size);
}
function render() {
  if (!data) return;
  const eps = data.endpoints;
  document.getElementById("meta").textContent = `revision ${data.revision} · ${data.networks.length} networks · ${data.agents.length} agents · ${eps.length} containers`;
  rows("networks", data.networks, n => [
    "<b>" + esc(n.name) + "</b>", esc(n.vni), esc(n.subnet) + (n.prefix ? " /" + n.prefix + " per agent" : ""),
    esc(n.subnet6), n.enabled ? '<span class="ok">enabled</span>' : '<span class="off">disabled</span>',
    n.usage.map(u => esc(u.agent) + ": " + esc(u.subnet) + " (" + u.used_v4 + " IPv4" + (u.subnet6 ? ", " + u.used_v6 + " IPv6" : "") + ")").join("<br>"),
    String(eps.filter(e => e.network === n.name).length),
    Object.entries(n.drops).map(([r, c]) => esc(r) + " " + c).join("<br>") || "0"]);
  rows("agents", data.agents, a => [esc(a.ip), esc(a.vtep_ip), esc(a.vtep_mac),
    '<span class="' + (a.status === "live" ? "ok" : "stale") + '">' + esc(a.status) + "</span>",
    a.last_heartbeat_seconds_ago == null ? "-" : Math.round(a.last_heartbeat_seconds_ago) + " s ago", String(a.endpoints)]);
  rows("containers", eps, e => [esc(e.ip), esc(e.network), esc(e.agent), esc(e.container), esc(e.interface), esc(e.mac)]);
  search();
}
function search() {
  const q = document.getElementById("search").value.trim(), out = document.getElementById("result");
  if (!q || !data) { out.innerHTML = ""; return; }
  const hits = data.endpoints.filter(e => e.ip === q || e.ip.startsWith(q));
  if (hits.length) {
    out.innerHTML = hits.map(e => '<div class="hit">' + esc(e.ip) + " is container " + esc(e.container) + " on network <b>" + esc(e.network) + "</b>, agent " + esc(e.agent) + " (" + esc(e.interface) + ")</div>").join("");
    return;
  }
  for (const n of data.networks) for (const u of n.usage) if (inSubnet(q, u.subnet)) {
    out.innerHTML = '<div class="hit">' + esc(q) + " is in agent " + esc(u.agent) + "'s share " + esc(u.subnet) + " of network <b>" + esc(n.name) + "</b>; no container has it</div>"; return;
  }
  for (const n of data.networks) if (inSubnet(q, n.subnet)) {
    out.innerHTML = '<div class="hit">' + esc(q) + " is in network <b>" + esc(n.name) + "</b> (" + esc(n.subnet) + "), on no agent yet</div>"; return;
  }
  out.innerHTML = '<div class="miss">' + esc(q) + " is on no overlay network</div>";
}
document.getElementById("search").addEventListener("input", search);
async function refresh() {
  const token = sessionStorage.getItem("overlay-token");
  try {
    const r = await fetch("/overlay-master/ui/data", {headers: token ? {Authorization: "Bearer " + token} : {}, cache: "no-store"});
    if (!r.ok) { document.getElementById("error").textContent = (await r.json().catch(() => ({}))).error || ("HTTP " + r.status); return; }
    document.getElementById("error").textContent = "";
    data = await r.json(); render();
  } catch (e) { document.getElementById("error").textContent = "master unreachable: " + e; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"##;
