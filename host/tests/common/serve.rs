//! `weir serve` as a child process of a test: started from a config file, its banner read for
//! the address and certificate fingerprint, killed with SIGKILL or stopped with SIGTERM, and
//! killed anyway if the test ends while it runs. Shared by the test binaries that crash and
//! restart a router (`#[path = "common/serve.rs"] mod serve;`).

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::future::Future;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The bound of every wait: long for a loaded 2-core CI machine, short enough to fail clearly.
const WAIT: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A running `weir serve`.
pub struct WeirServe {
    child: Child,
    /// What it logged so far (standard error), line by line; also echoed to the test's.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its certificate's fingerprint.
    pub fingerprint: String,
    /// The banner it printed.
    pub banner: Vec<String>,
    /// Its standard output after the banner, line by line.
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl WeirServe {
    /// Runs `weir serve --config CONFIG` and reads its banner for the address and fingerprint.
    pub async fn start(config: &Path) -> WeirServe {
        WeirServe::start_logging(config, "warn").await
    }

    /// [`WeirServe::start`] with `WEIR_LOG=level`.
    pub async fn start_logging(config: &Path, level: &str) -> WeirServe {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--config"])
            .arg(config)
            .env("WEIR_LOG", level)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir serve runs");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    log.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        // Keeps reading, so that weir never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned before the banner is read: a failure from here on kills it.
        let mut server = WeirServe {
            child,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            fingerprint: String::new(),
            banner: Vec::new(),
            lines,
        };
        let mut banner = Vec::new();
        while banner.last().map(String::as_str) != Some("Ctrl-C or SIGTERM stops gracefully.") {
            match within("weir serve's banner", server.lines.recv()).await {
                Some(line) => banner.push(line),
                None => panic!("weir serve exited after printing {banner:?}"),
            }
        }
        let word = |prefix: &str| -> String {
            banner
                .iter()
                .find_map(|line| line.strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no line `{prefix}…` in the banner {banner:?}"))
                .to_owned()
        };
        server.addr = word("weir serve: listening on ")
            .parse()
            .expect("the banner's address");
        server.fingerprint = word("certificate fingerprint (SHA-256): ");
        server.banner = banner;
        server
    }

    /// Waits until it logged a line containing `text`; returns that line.
    pub async fn logged(&self, text: &str) -> String {
        within(&format!("weir serve to log `{text}`"), async {
            loop {
                let found = self
                    .log
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .find(|line| line.contains(text))
                    .cloned();
                if let Some(line) = found {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9 weir serve");
        self.child.wait().expect("reap weir serve");
    }

    /// Sends `signal` (`-HUP`, `-TERM`, …) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}: {status}");
    }

    /// SIGTERM; waits for it to exit and returns the line it printed last.
    pub async fn stop(mut self) -> String {
        self.signal("-TERM");
        let mut last = String::new();
        while let Some(line) = within("weir serve's output to end", self.lines.recv()).await {
            last = line;
        }
        let status = within("weir serve to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("wait for weir serve") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(status.success(), "weir serve exited with {status}");
        last
    }
}

impl Drop for WeirServe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback UDP port nothing listens on now, for a router that must listen on the same
/// address after a restart.
pub fn free_udp_addr() -> SocketAddr {
    std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .and_then(|socket| socket.local_addr())
        .expect("a free UDP port on 127.0.0.1")
}
