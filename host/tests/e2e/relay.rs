//! A UDP relay between a QUIC client and a server on loopback that can black out: while it does,
//! it drops every datagram both ways, as a cut network path does, so the client's idle timeout
//! fires and it reconnects through the relay once the path is back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// A running relay; dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying datagrams that arrive at a new loopback port to `server`.
    pub async fn start(server: SocketAddr) -> Relay {
        let front = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the relay's port"),
        );
        let addr = front.local_addr().expect("relay address");
        let cut = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(front, server, cut.clone(), dropped.clone()));
        Relay {
            addr,
            cut,
            dropped,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram, both ways, for `period`.
    pub async fn black_out(&self, period: Duration) {
        self.cut.store(true, Ordering::SeqCst);
        tokio::time::sleep(period).await;
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Datagrams dropped by black-outs so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards client datagrams to the server through one upstream socket per client address, and
/// the server's answers back to that client.
async fn run(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    cut: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if cut.load(Ordering::SeqCst) {
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(
                    UdpSocket::bind("127.0.0.1:0")
                        .await
                        .expect("bind an upstream socket"),
                );
                tokio::spawn(back(
                    upstream.clone(),
                    front.clone(),
                    client,
                    cut.clone(),
                    dropped.clone(),
                ));
                upstreams.insert(client, upstream.clone());
                upstream
            }
        };
        // A send error is a lost datagram, which QUIC recovers from like any other loss.
        let _ = upstream.send_to(&buf[..len], server).await;
    }
}

/// Forwards the server's datagrams on `upstream` back to `client`.
async fn back(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    cut: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut buf).await {
        if cut.load(Ordering::SeqCst) {
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let _ = front.send_to(&buf[..len], client).await;
    }
}
