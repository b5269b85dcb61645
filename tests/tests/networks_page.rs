//! The master's Networks page in a real browser: headless Chromium driven by chromedriver
//! (WebDriver), both in the lab's master namespace, against a real lab cluster. A container
//! added through the CNI plugin appears with its address within a couple of seconds, a search
//! finds it, and it disappears once the plugin removes it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use overlay_lab::cluster::Cluster;
use overlay_lab::in_netns;
use overlay_tests::bin_path;
use overlay_tests::fixtures::cluster;
use serde_json::{Value, json};

const DRIVER_PORT: u16 = 9515;

/// One WebDriver command (JSON over HTTP to chromedriver on the master node's loopback).
fn webdriver(c: &Cluster, method: &str, path: &str, body: Option<Value>) -> Value {
    let (method, route) = (method.to_owned(), path.to_owned());
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let raw = in_netns(c.lab.master(), move || {
        let mut s = TcpStream::connect(("127.0.0.1", DRIVER_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        // chromedriver accepts only a localhost Host header.
        write!(
            s,
            "{method} {route} HTTP/1.1\r\nHost: 127.0.0.1:{DRIVER_PORT}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        // chromedriver keeps the connection open: read the head, then Content-Length bytes.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(raw);
            }
            raw.extend_from_slice(&buf[..n]);
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(length) = length
                && raw.len() >= end + 4 + length
            {
                return Ok(raw);
            }
        }
    })
    .unwrap_or_else(|e| panic!("webdriver {path}: {e:#}"));
    let text = String::from_utf8_lossy(&raw);
    let start = text.find("\r\n\r\n").expect("HTTP answer") + 4;
    let mut payload = &text[start..];
    // chromedriver answers with Content-Length, but be tolerant of chunking.
    if text[..start]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = payload.split_once("\r\n").map_or(payload, |(_, rest)| rest);
    }
    let end = payload.rfind('}').map_or(payload.len(), |i| i + 1);
    serde_json::from_str(&payload[..end]).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

struct Browser<'a> {
    c: &'a Cluster,
    session: String,
}

impl Browser<'_> {
    fn run(&self, script: &str) -> Value {
        let answer = webdriver(
            self.c,
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({"script": script, "args": []})),
        );
        answer["value"].clone()
    }

    fn text_of(&self, selector: &str) -> String {
        self.run(&format!(
            "const e = document.querySelector({selector:?}); return e ? e.innerText : '';"
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits until `selector`'s text satisfies `ok`; the time it took.
    fn wait_text(&self, selector: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            let text = self.text_of(selector);
            if ok(&text) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{selector} after {limit:?}: {text:?}\n(error line: {:?})",
                self.text_of("#error")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            webdriver(
                self.c,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            )
        }));
    }
}

/// The agent's CNI config for `network` (what a runtime would read), as one plugin config.
fn plugin_conf(c: &Cluster, agent: &str, network: &str) -> Value {
    let dir = c.cni_conf_dir(agent);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_string_lossy()
                .ends_with(&format!("-{network}.conflist"))
        })
        .unwrap_or_else(|| panic!("no conflist for {network} in {}", dir.display()));
    let list: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = json!("1.0.0");
    conf
}

/// Runs the CNI plugin in `agent`'s namespace; its stdout as JSON (or `null`).
fn cni(c: &Cluster, agent: &str, command: &str, id: &str, netns: &str, conf: &Value) -> Value {
    let mut cmd = c.node(agent).unwrap().command(bin_path("ebpf-overlay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_path("ebpf-overlay").parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "CNI {command}: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
}

/// Kills the browser processes of this test's profile (found by their exact
/// `--user-data-dir`, so only ours) however the test ends: chromedriver does not always take
/// Chromium with it.
struct BrowserReaper(String);

impl Drop for BrowserReaper {
    fn drop(&mut self) {
        let needle = format!("--user-data-dir={}", self.0);
        for _ in 0..3 {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return;
            };
            let mut found = false;
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == needle.as_bytes())
                {
                    found = true;
                    // SAFETY: kill(2) of a process this test started (its unique profile).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !found {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A container namespace named after the lab (removed on drop, and by the lab's teardown).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = overlay_lab::run("ip", &["netns", "del", &self.0]);
    }
}

#[test]
fn the_networks_page_shows_networks_agents_and_cni_containers_live() {
    let mut c = cluster(2);
    let master = c.lab.master().clone();
    let profile = c.work_dir().join("chromium-profile");
    let _reaper = BrowserReaper(profile.display().to_string());
    let log = std::fs::File::create(c.log_path("chromedriver")).unwrap();
    let mut driver = master.command("chromedriver");
    driver
        .arg(format!("--port={DRIVER_PORT}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    c.lab.spawn_command(driver).unwrap();
    let start = Instant::now();
    while webdriver_ready(&c).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = webdriver(
        &c,
        "POST",
        "/session",
        Some(json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}})),
    );
    let session = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_owned();
    let browser = Browser { c: &c, session };
    let token = std::fs::read_to_string(c.admin_token_file()).unwrap();
    let url = format!(
        "{}/overlay-master/ui#token={}",
        c.master_url(),
        token.trim()
    );
    webdriver(
        &c,
        "POST",
        &format!("/session/{}/url", browser.session),
        Some(json!({ "url": url })),
    );

    // Networks and agents, from the master's real state.
    browser.wait_text("#networks tbody", Duration::from_secs(10), |t| {
        t.contains("dcos") && t.contains("blue") && t.contains("9.0.0.0/8")
    });
    let agents = browser.text_of("#agents tbody");
    let a1 = c.node("a1").unwrap().ip.unwrap().to_string();
    let a2 = c.node("a2").unwrap().ip.unwrap().to_string();
    assert!(agents.contains(&a1) && agents.contains(&a2), "{agents}");
    assert!(agents.contains("live"), "{agents}");
    assert!(
        !browser.text_of("#error").contains("HTTP"),
        "{}",
        browser.text_of("#error")
    );

    // A container added through the CNI plugin appears with its address.
    let ns = Netns(format!("{}-ui1", c.lab.id()));
    overlay_lab::run("ip", &["netns", "add", &ns.0]).unwrap();
    let conf = plugin_conf(&c, "a2", "blue");
    let added_at = Instant::now();
    let result = cni(&c, "a2", "ADD", "ui-container-1", &ns.0, &conf);
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"))
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let seen = browser.wait_text("#containers tbody", Duration::from_secs(5), |t| {
        t.contains(&ip) && t.contains("ui-container-1")
    });
    let since_add = added_at.elapsed();
    eprintln!(
        "container {ip} on the page {seen:?} after the CNI ADD returned ({since_add:?} after it started)"
    );
    assert!(seen < Duration::from_secs(3), "took {seen:?}");
    let row = browser.text_of("#containers tbody");
    let line = row.lines().find(|l| l.contains(&ip)).unwrap();
    assert!(line.contains("blue") && line.contains(&a2), "{line}");

    // The search finds it: where it is, on which network and agent.
    browser.run(&format!(
        "const s = document.getElementById('search'); s.value = {ip:?}; \
         s.dispatchEvent(new Event('input')); return 1;"
    ));
    let found = browser.text_of("#result");
    assert!(
        found.contains(&ip) && found.contains("ui-container-1") && found.contains("blue"),
        "{found}"
    );
    // Screenshot for the README (docs/networks-page.png), with the search shown.
    let shot = webdriver(
        &c,
        "GET",
        &format!("/session/{}/screenshot", browser.session),
        None,
    );
    if let Some(png) = shot["value"].as_str()
        && let Ok(dir) = std::env::var("OVERLAY_SCREENSHOT_DIR")
    {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        std::fs::write(std::path::Path::new(&dir).join("networks-page.png"), bytes).unwrap();
    }

    // Removed through the plugin: gone from the page, and the search says no container has it.
    cni(&c, "a2", "DEL", "ui-container-1", &ns.0, &conf);
    let gone = browser.wait_text("#containers tbody", Duration::from_secs(5), |t| {
        !t.contains(&ip)
    });
    assert!(gone < Duration::from_secs(3), "took {gone:?}");
    browser.wait_text("#result", Duration::from_secs(3), |t| {
        t.contains("no container has it")
    });
}

fn webdriver_ready(c: &Cluster) -> Option<()> {
    let ok = in_netns(c.lab.master(), || {
        Ok(TcpStream::connect(("127.0.0.1", DRIVER_PORT)).is_ok())
    })
    .ok()?;
    ok.then_some(())
}
