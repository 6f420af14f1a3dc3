//! One in-process router for every test of a test binary: started on first use on a runtime
//! of its own thread (it outlives each test's runtime), serving until the test process exits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use weir::config::Config;
use weir::server::Server;

/// The shared router: where it listens, and its directory.
pub struct Router {
    pub addr: SocketAddr,
    pub fingerprint: String,
    /// Its admin endpoint (the config must have an `[admin]` section).
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

/// Starts a router from `config_text(dir)` in a new temporary directory, on thread `name`;
/// returns once it serves (within `wait`).
pub fn start(name: &str, config_text: fn(&Path) -> String, wait: Duration) -> Router {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let text = config_text(&dir);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the router's runtime");
            runtime.block_on(async move {
                let config = Config::parse(&text, dir.join("weir.toml")).expect("a config");
                let server = Server::start(config).await.expect("the router starts");
                tx.send(Router {
                    addr: server.local_addr(),
                    fingerprint: server.fingerprint(),
                    admin: server.admin_addr().expect("an admin endpoint"),
                    dir,
                })
                .expect("the test waits");
                // Serves until the test process exits.
                std::future::pending::<()>().await;
            });
        })
        .expect("the router's thread");
    rx.recv_timeout(wait).expect("the router started")
}
