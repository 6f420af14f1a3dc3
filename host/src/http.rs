//! weir's own small HTTP/1.1 endpoints (the Prometheus metrics, the admin API, the demo's
//! receiver) share one server: hyper on the caller's tokio runtime, a task per connection, a
//! bound on how long a client may take to send its headers, and a stop that waits.
//!
//! [`HttpServer::stop`] stops accepting, lets requests in flight finish for up to the
//! server's grace period, then closes every connection and returns once they are closed, so
//! the address is free again. Dropping the server stops it the same way, without waiting.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A response's body: whole, or streamed (`weir tap`).
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole response body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A response on its way.
pub type Responding = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What answers each request.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Responding + Send + Sync>;

/// A running endpoint.
#[derive(Debug)]
pub struct HttpServer {
    what: &'static str,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Listens on `addr` (port 0 picks a free port) and answers with `handler`; `what` names
    /// the endpoint in errors and logs (`metrics endpoint`). Fails if `addr` cannot be bound;
    /// the error names the endpoint and the address.
    pub async fn start(
        what: &'static str,
        addr: SocketAddr,
        grace: Duration,
        handler: Handler,
    ) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await.map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("{what}: cannot listen on {addr}: {err}"),
            )
        })?;
        let local_addr = listener.local_addr()?;
        let (shutdown, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(what, listener, grace, handler, stopped));
        Ok(HttpServer {
            what,
            local_addr,
            shutdown,
            task,
        })
    }

    /// The address it listens on (the port the system chose if it was asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, lets requests in flight finish (for up to the grace
    /// period), closes every connection and returns once all of that is done.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        if let Err(err) = self.task.await {
            tracing::error!("{} on {}: {err}", self.what, self.local_addr);
        }
    }
}

/// Resolves once the endpoint is told to stop, or once its [`HttpServer`] is dropped.
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped with the server: that stops too.
    let _ = stopped.wait_for(|stop| *stop).await;
}

async fn accept_loop(
    what: &'static str,
    listener: TcpListener,
    grace: Duration,
    handler: Handler,
    mut stopped: watch::Receiver<bool>,
) {
    let local_addr = listener.local_addr().ok();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop_requested(&mut stopped) => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections so that the set does not grow with every request.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!("{what} on {local_addr:?}: accept failed: {err}");
                // Errors such as running out of file descriptors last a while: don't spin.
                tokio::select! {
                    () = stop_requested(&mut stopped) => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let response = handler(request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop_requested(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(grace, connection).await {
                        Ok(result) => result,
                        Err(_elapsed) => {
                            tracing::debug!(
                                "{what} on {local_addr:?}: closed a connection that was still busy {grace:?} after stop"
                            );
                            return;
                        }
                    }
                }
            };
            if let Err(err) = result {
                tracing::debug!("{what} on {local_addr:?}: connection ended: {err}");
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
