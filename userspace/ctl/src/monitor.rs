//! `overlayctl monitor`: the agent's drop monitor, followed live.

use std::path::Path;

use anyhow::Context as _;
use overlay_api::{
    agent::LocalClient,
    monitor::{DropReport, MonitorEvent, MonitorFilter},
};

use crate::output::Format;

fn endpoint(addr: Option<std::net::IpAddr>, port: Option<u16>) -> String {
    match (addr, port) {
        (None, _) => "-".into(),
        (Some(a @ std::net::IpAddr::V6(_)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
    }
}

fn dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// One line for people: what, where, who.
pub fn drop_line(d: &DropReport) -> String {
    format!(
        "{} {} drop {} network={} {} {} -> {} src_container={} dst_container={} iface={} program={} len={}{}",
        d.time,
        d.agent,
        d.reason,
        dash(&d.network),
        d.protocol,
        endpoint(d.src, d.src_port),
        endpoint(d.dst, d.dst_port),
        dash(&d.src_container),
        dash(&d.dst_container),
        d.interface
            .clone()
            .unwrap_or_else(|| format!("if{}", d.ifindex)),
        d.program,
        d.len,
        if d.inner { " (inside VXLAN)" } else { "" }
    )
}

pub fn line(event: &MonitorEvent, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string(event)?,
        Format::Yaml => format!("---\n{}", serde_norway::to_string(event)?.trim_end()),
        Format::Text => match event {
            MonitorEvent::Drop(d) => drop_line(d),
            MonitorEvent::Skipped(s) if s.by == "agent" => format!(
                "skipped {} events: this monitor fell behind the agent",
                s.count
            ),
            MonitorEvent::Skipped(s) => format!(
                "skipped {} events: over the datapath's per-CPU rate limit (overlay-agent --monitor-rate) or the ring buffer was full",
                s.count
            ),
        },
    })
}

/// Prints events until the agent ends the stream, or `count` lines.
pub fn follow(
    socket: &Path,
    filter: &MonitorFilter,
    count: Option<u64>,
    format: Format,
) -> anyhow::Result<()> {
    let mut stream = LocalClient::new(socket)
        .monitor(filter)
        .map_err(|e| anyhow::anyhow!(crate::chain(&e)))
        .context("following the agent's drop monitor")?;
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        let Some(event) = stream
            .next_event()
            .map_err(|e| anyhow::anyhow!(crate::chain(&e)))?
        else {
            anyhow::bail!("the agent ended the monitor's stream (stopping?)");
        };
        println!("{}", line(&event, format)?);
        printed += 1;
    }
    Ok(())
}
