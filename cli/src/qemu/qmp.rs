//! A QMP client: QEMU's JSON machine protocol over a Unix socket, one
//! command at a time (the greeting, `qmp_capabilities`, then commands;
//! asynchronous events are skipped).

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect to the socket QEMU listens on (`-qmp unix:PATH,server=on,wait=off`),
    /// retrying until `timeout` while QEMU starts, and enter command mode.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("QMP: connect {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP: no greeting, got {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("QMP: read")? == 0 {
            bail!("QMP: QEMU closed the connection");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP: bad JSON {line:?}"))
    }

    /// Run `command` with `arguments`; its `return` value, or its error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").context("QMP: write")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(anyhow!(
                    "QMP {command}: {}",
                    e["desc"].as_str().unwrap_or("error")
                ));
            }
            // An event ({"event": ...}): not the answer.
        }
    }

    /// The balloon's current size of guest memory (`query-balloon`'s
    /// `actual`, bytes).
    pub fn balloon_actual(&mut self) -> anyhow::Result<u64> {
        let r = self.execute("query-balloon", json!({}))?;
        r["actual"]
            .as_u64()
            .ok_or_else(|| anyhow!("query-balloon: no actual in {r}"))
    }

    /// Read a QOM property.
    pub fn qom_get(&mut self, path: &str, property: &str) -> anyhow::Result<Value> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }
}
