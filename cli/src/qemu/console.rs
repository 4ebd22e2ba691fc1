//! The guest program's console: QEMU's first serial port on its standard
//! input and output (`-serial stdio`), one command a line, one `HP ` reply
//! a line (the protocol of vmm/qemu/guest/README.md). Kernel messages on
//! the same console are kept, the last few, for error messages.

use anyhow::{anyhow, bail, Context as _};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write as _};
use std::process::{ChildStdin, ChildStdout};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The lines of console output kept for an error message.
const TAIL: usize = 12;

/// One reply: `HP <verb> key=value ...`.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The word after `HP `.
    pub verb: String,
    /// Its `key=value` fields.
    pub fields: BTreeMap<String, String>,
}

impl Reply {
    fn parse(line: &str) -> Option<Reply> {
        let rest = line.trim().strip_prefix("HP ")?;
        let mut words = rest.split_whitespace();
        let verb = words.next()?.to_string();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Reply { verb, fields })
    }

    /// Field `key` as text.
    pub fn text(&self, key: &str) -> anyhow::Result<&str> {
        self.fields
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("guest reply '{}' has no {key}", self.verb))
    }

    /// Field `key` as a number.
    pub fn num(&self, key: &str) -> anyhow::Result<u64> {
        let t = self.text(key)?;
        t.parse()
            .map_err(|_| anyhow!("guest reply '{}': {key}={t} is not a number", self.verb))
    }
}

/// The console of one running guest.
pub struct Console {
    input: ChildStdin,
    replies: Receiver<Reply>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Console {
    /// Read `output` on a thread of its own until QEMU closes it.
    pub fn new(input: ChildStdin, output: ChildStdout) -> Console {
        let (tx, replies) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL)));
        let kept = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                match Reply::parse(&line) {
                    Some(r) => {
                        if tx.send(r).is_err() {
                            break;
                        }
                    }
                    None if line.trim().is_empty() => {}
                    None => {
                        let mut t = kept.lock().unwrap_or_else(|e| e.into_inner());
                        if t.len() == TAIL {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            }
        });
        Console {
            input,
            replies,
            tail,
        }
    }

    /// The last lines the console printed that were not replies.
    pub fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Wait for the next reply whose verb is `verb` (`ready` after a boot).
    pub fn wait(&self, verb: &str, timeout: Duration) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(r) if r.verb == verb => return Ok(r),
                Ok(r) if r.verb == "error" => {
                    bail!("the guest program answered an error: {:?}", r.fields)
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no '{verb}' from the guest within {} s (console: {})",
                    timeout.as_secs(),
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "QEMU closed the console while waiting for '{verb}' (console: {})",
                    self.tail()
                ),
            }
        }
    }

    /// Send `command` and wait for its reply (of the command's own verb).
    pub fn ask(&mut self, command: &str, timeout: Duration) -> anyhow::Result<Reply> {
        writeln!(self.input, "{command}")
            .and_then(|_| self.input.flush())
            .with_context(|| format!("writing '{command}' to the guest's console"))?;
        let verb = command.split_whitespace().next().unwrap_or(command);
        self.wait(verb, timeout)
            .with_context(|| format!("guest command '{command}'"))
    }
}
